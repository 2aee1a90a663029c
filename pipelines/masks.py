"""Instance-mask codecs and geometry: COCO RLE / polygons, PNG bytes, boxes, IoU.

Masks in memory are HxW bool arrays; their shard encoding is pipelines/shards/contract.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# ---- COCO RLE (column-major runs, starting with a run of zeros) -------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE ({"size": [h, w], "counts": str}) of a bool mask."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(h), int(w)], "counts": _counts_to_string(runs)}


def rle_decode(rle: dict) -> np.ndarray:
    """Bool mask from a COCO RLE whose counts are a compressed string or a list of ints."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = _string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs sum to {sum(runs)}, expected {h * w} for size {h}x{w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()


def _counts_to_string(runs: Sequence[int]) -> str:
    # COCO's LEB128-like text form: each run (after the first two, as a delta to the run two
    # before) in 5-bit groups, continuation bit 0x20, offset by 48 into printable ASCII.
    out = []
    for i, run in enumerate(runs):
        x = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _string_to_counts(s: str | bytes) -> list[int]:
    if isinstance(s, bytes):
        s = s.decode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


# ---- polygons ---------------------------------------------------------------------------------


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons ([[x0, y0, x1, y1, ...], ...]) without anti-aliasing."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def segmentation_to_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` field (polygon list, RLE dict) as a bool mask of the image size."""
    if isinstance(segmentation, dict):
        mask = rle_decode(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {mask.shape} does not match image {height}x{width}")
        return mask
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")


# ---- geometry ---------------------------------------------------------------------------------


def mask_bbox(mask: np.ndarray) -> list[float] | None:
    """[x0, y0, x1, y1] (pixel edges, exclusive max) of a bool mask, or None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_intersection(a: Sequence[float], b: Sequence[float]) -> float:
    return box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0
