"""Stage 4: reference crops, a square around the subject's box with a margin, un-augmented.

Parts of the square outside the image are zero (black, mask 0), so the box stays centred. The
reference mask holds only that subject's pixels. Crops larger than `max_side` are downscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from anystory.crop import cut_square
from pipelines.batch import Batch, live_rows
from pipelines.config import RefsConfig


def crop_reference(image: np.ndarray, mask: np.ndarray, bbox: list[float], cfg: RefsConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    # The crop inference makes too (anystory.crop): the model sees one framing of its subjects.
    ref, refmask = cut_square(image, mask, bbox, cfg.margin)
    side = ref.shape[0]
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
