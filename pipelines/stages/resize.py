"""The output size policy (img2dataset style), applied right after decoding.

Resize so the short side is at most `data.decode.max_short_side` (aspect kept, never upscaled), then
optionally crop the centre to a square (`data.decode.center_crop`). A `Geometry` records what was
done, so that masks given in the input's coordinates follow the pixels and the sample json carries
the original size and crop (SDXL's size and crop conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.config import DecodeConfig


@dataclass(frozen=True)
class Geometry:
    """Input (original_width x original_height) -> resized (resized_width x resized_height) -> the
    output: the window of `width` x `height` at (crop_left, crop_top) of the resized image."""

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    crop_left: int = 0
    crop_top: int = 0
    width: int = 0
    height: int = 0

    @property
    def identity(self) -> bool:
        return (self.resized_width, self.resized_height, self.width, self.height) == (
            self.original_width, self.original_height, self.original_width, self.original_height)

    def _fit(self, im: Image.Image, resample: Image.Resampling) -> Image.Image:
        if (im.width, im.height) != (self.original_width, self.original_height):
            raise ValueError(f"{im.width}x{im.height} input, geometry made for "
                             f"{self.original_width}x{self.original_height}")
        if (self.resized_width, self.resized_height) != (im.width, im.height):
            # reducing_gap: a fast integer reduction first, then the filter; exact enough past 3x.
            im = im.resize((self.resized_width, self.resized_height), resample, reducing_gap=3.0)
        box = (self.crop_left, self.crop_top, self.crop_left + self.width, self.crop_top + self.height)
        return im if box == (0, 0, im.width, im.height) else im.crop(box)

    def image(self, array: np.ndarray) -> np.ndarray:
        """An RGB (HxWx3) or single-channel (HxW) uint8 image."""
        if self.identity:
            return array
        return np.asarray(self._fit(Image.fromarray(array), Image.Resampling.LANCZOS))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask: area-weighted resize, then half coverage, so thin parts survive as they look."""
        if self.identity:
            return mask
        im = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        return np.asarray(self._fit(im, Image.Resampling.BILINEAR)) > 127

    def json_fields(self) -> dict[str, Any]:
        return {"original_width": self.original_width, "original_height": self.original_height,
                "crop_left": self.crop_left, "crop_top": self.crop_top}


def output_geometry(width: int, height: int, cfg: DecodeConfig) -> Geometry:
    short = min(width, height)
    target = short if cfg.max_short_side is None else min(short, cfg.max_short_side)  # never upscale
    scale = target / short
    rw, rh = (width, height) if target == short else (max(1, round(width * scale)), max(1, round(height * scale)))
    if not cfg.center_crop:
        return Geometry(width, height, rw, rh, 0, 0, rw, rh)
    side = min(rw, rh)
    return Geometry(width, height, rw, rh, (rw - side) // 2, (rh - side) // 2, side, side)


def identity_geometry(width: int, height: int) -> Geometry:
    return Geometry(width, height, width, height, 0, 0, width, height)
