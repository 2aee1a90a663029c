"""Scene cuts: a cut where the colour histograms of consecutive frames differ a lot.

The decoder (stages/decode_video.py) runs `CutDetector` on every decoded frame while it streams the
video (not just on the sampled ones, so a cut between two samples is still found) and records
`cuts`; `DetectScenes` labels each sampled frame with its scene (`scene_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows
from pipelines.config import VideoConfig


def hist_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two normalised histograms: 0 (same) .. 1 (disjoint)."""
    return float(0.5 * np.abs(a - b).sum())


@dataclass
class CutDetector:
    """Online: fed one frame histogram at a time, says whether that frame starts a new scene."""

    threshold: float
    _prev: np.ndarray | None = field(default=None, repr=False)

    def is_cut(self, hist: np.ndarray) -> bool:
        cut = self._prev is not None and hist_distance(self._prev, hist) > self.threshold
        self._prev = hist
        return cut


def find_cuts(thumbs: np.ndarray, threshold: float) -> list[int]:
    """Frame indices that start a new scene, over a stack of per-frame histograms."""
    detector = CutDetector(threshold)
    return [i for i, h in enumerate(thumbs) if detector.is_cut(h)]


@dataclass
class DetectScenes:
    cfg: VideoConfig

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "scene_ids")
        for i in live_rows(batch):
            cuts = batch["cuts"][i]
            batch["scene_ids"][i] = [int(np.searchsorted(cuts, f, side="right")) for f in batch["frame_indices"][i]]
        return batch
