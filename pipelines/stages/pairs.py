"""Stage 5: paired samples from videos. Reference from frame A, target frame B, same scene.

Per scene (at most `max_frames_per_scene` frames, stages/decode_video.py): track instances
(stages/track.py), then sample candidate pairs by time gap: the allowed gaps (`min_gap_s` up to the
scene's length) are split into `max_pairs_per_scene` equal bins, and each target frame B is tried
with the one frame A whose gap is nearest each bin's centre, so the work per scene is bounded
(frames x bins, not frames squared) and the kept pairs spread over the gaps instead of crowding at
the smallest. A pair is kept only if every subject of B has a partner in A on the same track whose
mask IoU with it is at most `max_pair_iou` (enough change) and whose match score (weakest track
link, and direct appearance similarity of the two instances) is at least `min_pair_quality`.
Selection takes the bins in turn, best pair of each first (more subjects, higher quality); each
frame is a target at most once. Adds `samples` (list of sample rows) and `dropped` (reasons for
discarded candidates) to video rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import RefsConfig, VideoConfig
from pipelines.masks import mask_iou
from pipelines.stages.refs import crop_reference
from pipelines.stages.track import appearance, chain_confidence, similarity, track_scene


def pair_candidate(a: int, b: int, tracks, subjects, images, cfg: VideoConfig,
                   desc: dict[tuple[int, int], np.ndarray] | None = None) -> tuple[list[dict], str | None]:
    """Per-subject pairing of target frame b with reference frame a, or the reason it fails.
    `desc`: appearances by (frame slot, subject), as track_scene computed them."""
    by_b = {tr.members[b]: tr for tr in tracks if b in tr.members}
    if not subjects[b]:
        return [], "empty_target"
    out = []
    for j, s in enumerate(subjects[b]):
        tr = by_b.get(j)
        if tr is None or a not in tr.members:
            return [], "unmatched_subject"
        ref = subjects[a][tr.members[a]]
        iou = mask_iou(ref["mask"], s["mask"])
        if iou > cfg.max_pair_iou:
            return [], "too_similar"
        da = desc[(a, tr.members[a])] if desc else appearance(images[a], ref["mask"])
        db = desc[(b, j)] if desc else appearance(images[b], s["mask"])
        direct = similarity(da, db)
        score = min(chain_confidence(tr, a, b), direct)
        if score < cfg.min_pair_quality:
            return [], "low_match_score"
        out.append({"target": s, "ref": ref, "mask_iou": iou, "match_score": score})
    return out, None


def make_sample(video: dict[str, Any], a: int, b: int, matched: list[dict], refs_cfg: RefsConfig) -> dict:
    subjects = []
    for m in matched:
        s = {k: v for k, v in m["target"].items() if k not in ("ref", "refmask")}
        s["ref"], s["refmask"] = crop_reference(video["frames"][a], m["ref"]["mask"], m["ref"]["bbox"], refs_cfg)
        s["ref_from"] = f"frame:{video['frame_indices'][a]}"
        s["match_score"], s["mask_iou"] = round(m["match_score"], 4), round(m["mask_iou"], 4)
        if "identity" in m["ref"]:
            s["ref_identity"] = m["ref"]["identity"]
        subjects.append(s)
    ta, tb = video["frame_times"][a], video["frame_times"][b]
    return {
        "image": video["frames"][b], "caption": video["caption"], "subjects": subjects,
        "source_id": f"{video['source_id']}#{video['frame_indices'][b]}",
        "frame_a": video["frame_indices"][a], "frame_b": video["frame_indices"][b],
        "time_gap_s": round(abs(tb - ta), 4), "pair_quality": round(min(m["match_score"] for m in matched), 4),
        "geometry": video.get("geometry"), "scores": video["scores"][b] if video.get("scores") else None,
    }


@dataclass
class MakePairs:
    video: VideoConfig
    refs: RefsConfig

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "samples")
        ensure_column(batch, "dropped")
        for i in list(live_rows(batch)):
            row = {k: v[i] for k, v in batch.items()}
            samples, dropped = self.pairs_of(row)
            batch["samples"][i], batch["dropped"][i] = samples, dropped
            if not samples:
                rejects = row.get("frame_rejects") or [None] * len(row["frames"])
                has_subjects = any(row["subjects"][k] and not rejects[k] for k in range(len(row["frames"])))
                reject(batch, i, "no_pairs" if has_subjects else "no_subjects")
            # Frames are now inside the samples; drop the rest to keep the row light.
            batch["frames"][i] = None
        return batch

    def pairs_of(self, row: dict[str, Any]) -> tuple[list[dict], list[str]]:
        rejects = row.get("frame_rejects") or [None] * len(row["frames"])
        # A frame the filter rejected (too many subjects, too small, ...) is no target and no reference.
        subjects = [(s or []) if r is None else [] for s, r in zip(row["subjects"], rejects, strict=True)]
        times = row["frame_times"]
        samples, dropped = [], []
        for scene in sorted(set(row["scene_ids"])):
            slots = [k for k, sid in enumerate(row["scene_ids"]) if sid == scene]
            desc: dict[tuple[int, int], np.ndarray] = {}
            tracks = track_scene(slots, subjects, row["frames"], self.video, desc, times)
            bins = gap_bins(self.video.min_gap_s, times[slots[-1]] - times[slots[0]], self.video.max_pairs_per_scene)
            per_bin: list[list[tuple]] = [[] for _ in bins]
            for b in slots:
                for n, a in nearest_per_bin(b, slots, times, bins):
                    matched, why = pair_candidate(a, b, tracks, subjects, row["frames"], self.video, desc)
                    if why:
                        dropped.append(f"pair_{why}")
                        continue
                    per_bin[n].append((-len(matched), -min(m["match_score"] for m in matched), a, b, matched))
            for a, b, matched in take_spread(per_bin, self.video.max_pairs_per_scene):
                samples.append(make_sample(row, a, b, matched, self.refs))
        return samples, dropped


def gap_bins(min_gap: float, span: float, n: int) -> list[tuple[float, float]]:
    """`n` equal bins of the allowed gaps, [min_gap, span]; none when the scene is shorter than min_gap."""
    if span + 1e-9 < min_gap:
        return []
    width = (span - min_gap) / n
    return [(min_gap + i * width, min_gap + (i + 1) * width) for i in range(n)]


def nearest_per_bin(b: int, slots: list[int], times: list[float], bins: list[tuple[float, float]]
                    ) -> list[tuple[int, int]]:
    """(bin, reference slot a): per bin, the a (before or after b) whose gap to b is nearest the bin's centre."""
    out = []
    for n, (lo, hi) in enumerate(bins):
        centre = (lo + hi) / 2
        inside = [a for a in slots if a != b and lo - 1e-9 <= abs(times[a] - times[b]) <= hi + 1e-9]
        if inside:
            out.append((n, min(inside, key=lambda a: (abs(abs(times[a] - times[b]) - centre), a))))
    return out


def take_spread(per_bin: list[list[tuple]], limit: int) -> list[tuple[int, int, list[dict]]]:
    """Up to `limit` pairs (a, b, matched), taking the bins in turn, each bin's best first (more
    subjects, higher quality); a frame is the target of one pair at most."""
    queues = [sorted(c, key=lambda c: c[:4]) for c in per_bin]
    used: set[int] = set()
    taken: list[tuple[int, int, list[dict]]] = []
    while len(taken) < limit and any(queues):
        for q in queues:
            while q and q[0][3] in used:
                q.pop(0)
            if q and len(taken) < limit:
                *_, a, b, matched = q.pop(0)
                used.add(b)
                taken.append((a, b, matched))
    return taken
