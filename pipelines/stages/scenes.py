"""Scene-cut detection: a cut where the colour histograms of consecutive frames differ a lot.

Uses the histograms of every decoded frame (not just the sampled ones), so a cut between two
samples is still found. Adds `scene_ids` (one per sampled frame) and `cuts` (frame indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows
from pipelines.config import VideoConfig


def find_cuts(thumbs: np.ndarray, threshold: float) -> list[int]:
    """Frame indices that start a new scene (total-variation distance of histograms > threshold)."""
    if len(thumbs) < 2:
        return []
    dist = 0.5 * np.abs(np.diff(thumbs, axis=0)).sum(axis=1)
    return [int(i) + 1 for i in np.flatnonzero(dist > threshold)]


@dataclass
class DetectScenes:
    cfg: VideoConfig

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "scene_ids")
        ensure_column(batch, "cuts")
        for i in live_rows(batch):
            cuts = find_cuts(batch["thumbs"][i], self.cfg.cut_threshold)
            batch["cuts"][i] = cuts
            batch["scene_ids"][i] = [int(np.searchsorted(cuts, f, side="right")) for f in batch["frame_indices"][i]]
            batch["thumbs"][i] = None  # only needed here
        return batch
