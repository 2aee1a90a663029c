"""Stage 5: paired samples from videos. Reference from frame A, target frame B, same scene.

Per scene: track instances (stages/track.py), then consider frame pairs (A, B) at least `min_gap_s`
apart. A pair is kept only if every subject of B has a partner in A on the same track whose mask IoU
with it is at most `max_pair_iou` (enough change) and whose match score (weakest track link, and
direct appearance similarity of the two instances) is at least `min_pair_quality`.
Best pairs first (more subjects, higher quality, larger gap); each frame is a target at most once.
Adds `samples` (list of sample rows) and `dropped` (reasons for discarded candidates) to video rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import RefsConfig, VideoConfig
from pipelines.masks import mask_iou
from pipelines.stages.refs import crop_reference
from pipelines.stages.track import appearance, chain_confidence, similarity, track_scene


def pair_candidate(a: int, b: int, tracks, subjects, images, cfg: VideoConfig) -> tuple[list[dict], str | None]:
    """Per-subject pairing of target frame b with reference frame a, or the reason it fails."""
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
        direct = similarity(appearance(images[a], ref["mask"]), appearance(images[b], s["mask"]))
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
        "geometry": video.get("geometry"),
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
        samples, dropped = [], []
        for scene in sorted(set(row["scene_ids"])):
            slots = [k for k, sid in enumerate(row["scene_ids"]) if sid == scene]
            tracks = track_scene(slots, subjects, row["frames"], self.video)
            candidates = []
            for b in slots:
                for a in slots:
                    if a == b or abs(row["frame_times"][b] - row["frame_times"][a]) + 1e-9 < self.video.min_gap_s:
                        continue
                    matched, why = pair_candidate(a, b, tracks, subjects, row["frames"], self.video)
                    if why:
                        dropped.append(f"pair_{why}")
                        continue
                    quality = min(m["match_score"] for m in matched)
                    gap = abs(row["frame_times"][b] - row["frame_times"][a])
                    candidates.append((-len(matched), -quality, -gap, a, b, matched))
            used_targets: set[int] = set()
            taken = 0
            for *_, a, b, matched in sorted(candidates, key=lambda c: c[:5]):
                if b in used_targets or taken >= self.video.max_pairs_per_scene:
                    continue
                used_targets.add(b)
                taken += 1
                samples.append(make_sample(row, a, b, matched, self.refs))
        return samples, dropped
