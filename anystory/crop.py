"""The one reference crop, used where references are made for training (the data build) and for
inference (`AnyStoryPipeline`): a square around the subject's box with a margin, zero (black, mask 0)
where the square leaves the image, so the box stays centred. numpy only, so that the data build's
workers need nothing else to import it."""

from __future__ import annotations

import math

import numpy as np

# Of the box's longer side, on each side: the data build's default (`data.refs.margin`), which the
# trained model has seen; inference uses the same.
REF_MARGIN = 0.1


def mask_box(mask: np.ndarray) -> list[float]:
    """[x0, y0, x1, y1] of a non-empty boolean mask (x1, y1 exclusive), as the data build writes boxes."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def square_box(bbox: list[float], margin: float = REF_MARGIN) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop, in integer pixels, possibly extending past the image."""
    x0, y0, x1, y1 = bbox
    side = max(math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin)), 1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return math.floor(cx - side / 2), math.floor(cy - side / 2), side


def cut_square(image: np.ndarray, mask: np.ndarray, bbox: list[float],
               margin: float = REF_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (H, W) bool mask -> the square reference and its mask."""
    h, w = image.shape[:2]
    x0, y0, side = square_box(bbox, margin)
    ref = np.zeros((side, side, 3), image.dtype)
    refmask = np.zeros((side, side), bool)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        ref[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        refmask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    return ref, refmask
