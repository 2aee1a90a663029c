"""Stage 4: reference crops, a square around the subject's box with a margin, un-augmented.

Parts of the square outside the image are zero (black, mask 0), so the box stays centred. The
reference mask holds only that subject's pixels. Crops larger than `max_side` are downscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.batch import Batch, live_rows
from pipelines.config import RefsConfig


def square_crop_box(bbox: list[float], margin: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop, in integer pixels, possibly extending past the image."""
    x0, y0, x1, y1 = bbox
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = max(int(np.ceil(side)), 1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2)), side


def crop_reference(image: np.ndarray, mask: np.ndarray, bbox: list[float], cfg: RefsConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    x0, y0, side = square_crop_box(bbox, cfg.margin)
    ref = np.zeros((side, side, 3), np.uint8)
    refmask = np.zeros((side, side), bool)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        ref[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        refmask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    if side > cfg.max_side:
        ref = np.asarray(Image.fromarray(ref).resize((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC))
        refmask = np.asarray(Image.fromarray(refmask.astype(np.uint8) * 255).resize(
            (cfg.max_side, cfg.max_side), Image.Resampling.NEAREST)) > 127
    return ref, refmask


@dataclass
class CutReferences:
    """Unpaired samples: each subject's reference is cut from the target image itself."""

    cfg: RefsConfig

    def __call__(self, batch: Batch) -> Batch:
        for i in live_rows(batch):
            for s in batch["subjects"][i]:
                s["ref"], s["refmask"] = crop_reference(batch["image"][i], s["mask"], s["bbox"], self.cfg)
                s["ref_from"] = "self"
        return batch
