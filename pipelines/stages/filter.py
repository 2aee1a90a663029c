"""Stage 3: drop weak subjects, then reject images that are unusable as targets.

Per subject (dropped, reason counted in `dropped`): box score, mask area fraction, mask fill of its
box, box aspect, a box mostly inside a larger one, a mask that repeats another instance.
Per image (row rejected): size / aspect, subject count after the per-subject filters.
Sets `area_frac` and `box_fill` on every kept subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import FilterConfig
from pipelines.masks import box_area, box_intersection, mask_iou


def subject_measures(s: dict, image_area: int) -> dict[str, float]:
    """`area_frac` (mask pixels / image pixels) and `box_fill` (mask pixels / box pixels) of a subject."""
    pixels = int(np.count_nonzero(s["mask"]))
    return {"area_frac": pixels / image_area, "box_fill": pixels / max(box_area(s["bbox"]), 1.0)}


def subject_drop_reason(s: dict, measures: dict[str, float], cfg: FilterConfig) -> str | None:
    """Why the filter drops subject `s` (whose `subject_measures` are given), or None to keep it."""
    if s["score"] < cfg.min_score:
        return "low_score"
    if measures["area_frac"] < cfg.min_area_frac:
        return "small_area"
    if measures["area_frac"] > cfg.max_area_frac:
        return "large_area"
    if measures["box_fill"] < cfg.min_box_fill:
        return "sparse_mask"
    x0, y0, x1, y1 = s["bbox"]
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    if max(w / h, h / w) > cfg.max_box_aspect:
        return "box_aspect"
    return None


def overlap_drops(subjects: list[dict], cfg: FilterConfig) -> dict[int, str]:
    """Indices to drop because a box sits inside a larger one or a mask duplicates another instance."""
    order = sorted(range(len(subjects)), key=lambda i: (-box_area(subjects[i]["bbox"]), i))
    drops: dict[int, str] = {}
    for rank, i in enumerate(order):
        for j in order[:rank]:
            if j in drops:
                continue
            a = subjects[i]
            if mask_iou(a["mask"], subjects[j]["mask"]) > cfg.max_instance_iou:
                drops[i] = "duplicate_instance"
            elif box_intersection(a["bbox"], subjects[j]["bbox"]) / max(box_area(a["bbox"]), 1.0) > cfg.max_containment:
                drops[i] = "contained"
            if i in drops:
                break
    return drops


@dataclass
class FilterSubjects:
    cfg: FilterConfig

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "dropped")
        for i in list(live_rows(batch)):
            h, w = batch["image"][i].shape[:2]
            if min(h, w) < self.cfg.min_image_side:
                reject(batch, i, "image_too_small")
                continue
            if max(h, w) / min(h, w) > self.cfg.max_image_aspect:
                reject(batch, i, "image_aspect")
                continue
            dropped: list[str] = []
            kept = []
            for s in batch["subjects"][i]:
                measures = subject_measures(s, h * w)
                reason = subject_drop_reason(s, measures, self.cfg)
                (dropped.append(reason) if reason else kept.append({**s, **measures}))
            drops = overlap_drops(kept, self.cfg)
            dropped.extend(drops.values())
            kept = [s for k, s in enumerate(kept) if k not in drops]
            batch["subjects"][i], batch["dropped"][i] = kept, dropped
            if not kept:
                reject(batch, i, "no_subjects")
            elif len(kept) < self.cfg.min_subjects:
                reject(batch, i, "too_few_subjects")
            elif len(kept) > self.cfg.max_subjects:
                reject(batch, i, "too_many_subjects")
        return batch


@dataclass
class DropDuplicates:
    """Exact duplicates (same decoded pixels) within one shard: the first occurrence is kept.

    One instance per shard, so what it has seen never leaks between shards or builds.
    """

    enabled: bool = True
    seen: set[str] = field(default_factory=set)

    def __call__(self, batch: Batch) -> Batch:
        if not self.enabled:
            return batch
        for i in list(live_rows(batch)):
            digest = batch["pixel_sha256"][i]
            if digest in self.seen:
                reject(batch, i, "duplicate")
            else:
                self.seen.add(digest)
        return batch


@dataclass
class DropNearDuplicates:
    """Rows the build's near-duplicate pass (pipelines/near_dupes.py) listed for this shard, by source id."""

    listed: frozenset[str] = frozenset()

    def __call__(self, batch: Batch) -> Batch:
        if not self.listed:
            return batch
        for i in list(live_rows(batch)):
            if batch["source_id"][i] in self.listed:
                reject(batch, i, "near_duplicate")
        return batch
