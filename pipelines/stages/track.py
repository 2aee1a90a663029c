"""Instance matching across the sampled frames of one scene: mask-IoU tracking plus appearance.

A detection joins the track whose last member it matches best, where
  link = iou_weight * IoU(masks) + (1 - iou_weight) * appearance similarity
(appearance alone between frames far apart in time, see track_scene),
accepted when link >= min_link_score and appearance >= min_appearance (greedy, best links first).
Appearance carries the match when motion between samples leaves little overlap; IoU separates
look-alikes that stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.config import VideoConfig
from pipelines.masks import mask_iou

BINS = 8


def appearance(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised colour histogram (8x8x8) of the subject's pixels."""
    px = image[mask].astype(np.int64) // (256 // BINS)
    idx = (px[:, 0] * BINS + px[:, 1]) * BINS + px[:, 2]
    h = np.bincount(idx, minlength=BINS**3).astype(np.float64)
    return h / max(h.sum(), 1.0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya coefficient: 1 for identical colour distributions, 0 for disjoint ones."""
    return float(np.sqrt(a * b).sum())


@dataclass
class Track:
    members: dict[int, int] = field(default_factory=dict)  # frame slot -> subject index in that frame
    links: dict[int, float] = field(default_factory=dict)  # frame slot -> score of the link into it
    last: int = -1


def track_scene(slots: list[int], subjects: list[list[dict]], images: list[np.ndarray], cfg: VideoConfig,
                desc: dict[tuple[int, int], np.ndarray] | None = None, times: list[float] | None = None
                ) -> list[Track]:
    """Tracks over the frame `slots` of one scene (in time order); `subjects[k]` are frame k's instances.
    `desc`, when given, is filled with the appearance of every (frame slot, subject) for reuse.
    `times` (seconds, by slot): two frames further apart than the sampling allows for
    (`(max_missed_frames + 1) / sample_fps`: a long scene's frames, thinned by the decoder) are linked
    by appearance alone, since their subjects have moved too far for mask overlap to mean anything."""
    tracks: list[Track] = []
    desc = {} if desc is None else desc
    position = {k: pos for pos, k in enumerate(slots)}
    near_s = (cfg.max_missed_frames + 1) / cfg.sample_fps + 1e-6
    for pos, k in enumerate(slots):
        for j, s in enumerate(subjects[k]):
            desc[(k, j)] = appearance(images[k], s["mask"])
        candidates = []
        for t, tr in enumerate(tracks):
            gap = pos - position[tr.last] - 1
            if gap > cfg.max_missed_frames:
                continue
            prev = subjects[tr.last][tr.members[tr.last]]
            iou_weight = cfg.iou_weight if times is None or times[k] - times[tr.last] <= near_s else 0.0
            for j, s in enumerate(subjects[k]):
                app = similarity(desc[(tr.last, tr.members[tr.last])], desc[(k, j)])
                link = iou_weight * mask_iou(prev["mask"], s["mask"]) + (1 - iou_weight) * app
                if app >= cfg.min_appearance and link >= cfg.min_link_score:
                    candidates.append((link, t, j))
        used_t, used_j = set(), set()
        for link, t, j in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
            if t in used_t or j in used_j:
                continue
            used_t.add(t)
            used_j.add(j)
            tracks[t].members[k], tracks[t].links[k], tracks[t].last = j, link, k
        for j in range(len(subjects[k])):
            if j not in used_j:
                tracks.append(Track(members={k: j}, links={k: 1.0}, last=k))
    return tracks


def chain_confidence(track: Track, a: int, b: int) -> float:
    """The weakest link between frame slots a and b: how sure we are it is one subject throughout."""
    lo, hi = min(a, b), max(a, b)
    return min((s for k, s in track.links.items() if lo < k <= hi), default=1.0)
