"""Reference augmentation applied at load time (paper Section 3.1: random rotation, cropping and
zero-padding; magnitudes from paper.md Section 8, item 7). Operates on an (H, W, 3) uint8 reference
and its (H, W) bool mask together, so the mask always follows the pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class AugmentConfig:
    p_rotate: float = 0.5
    max_rotation_deg: float = 15.0
    p_crop: float = 0.5
    min_crop_keep: float = 0.65  # fraction of the subject box's side kept by a random crop
    p_pad: float = 0.5
    pad_scale: tuple[float, float] = (0.6, 1.0)  # subject size relative to the padded square


def _rotate(image: np.ndarray, mask: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    img = Image.fromarray(image).rotate(degrees, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    msk = Image.fromarray(mask.astype(np.uint8) * 255).rotate(degrees, resample=Image.NEAREST, fillcolor=0)
    return np.asarray(img), np.asarray(msk) > 127


def _crop(image: np.ndarray, mask: np.ndarray, keep: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = max(1, int(round((y1 - y0) * keep))), max(1, int(round((x1 - x0) * keep)))
    top = int(rng.integers(y0, y1 - h + 1))
    left = int(rng.integers(x0, x1 - w + 1))
    return image[top : top + h, left : left + w], mask[top : top + h, left : left + w]


def place_in_square(image: np.ndarray, mask: np.ndarray, side: int, top: int, left: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero square of `side` with the image (and mask) at (top, left)."""
    h, w = mask.shape
    out_img = np.zeros((side, side, 3), dtype=image.dtype)
    out_mask = np.zeros((side, side), dtype=bool)
    out_img[top : top + h, left : left + w] = image
    out_mask[top : top + h, left : left + w] = mask
    return out_img, out_mask


def pad_to_square(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad, centred, to a square (the stored reference is square; a random crop may not be)."""
    h, w = mask.shape
    if h == w:
        return image, mask
    side = max(h, w)
    return place_in_square(image, mask, side, (side - h) // 2, (side - w) // 2)


def _pad(image: np.ndarray, mask: np.ndarray, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    side = int(np.ceil(max(h, w) / scale))
    return place_in_square(image, mask, side, int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1)))


def augment_reference(
    image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation, crop and zero-padding, each with its probability. A step that would leave the
    subject empty is skipped, so the output mask is never empty when the input mask is not."""
    if rng.random() < cfg.p_rotate:
        candidate = _rotate(image, mask, float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)))
        if candidate[1].any():
            image, mask = candidate
    if rng.random() < cfg.p_crop:
        candidate = _crop(image, mask, float(rng.uniform(cfg.min_crop_keep, 1.0)), rng)
        if candidate[1].any():
            image, mask = candidate
    if rng.random() < cfg.p_pad:
        image, mask = _pad(image, mask, float(rng.uniform(*cfg.pad_scale)), rng)
    return image, mask
