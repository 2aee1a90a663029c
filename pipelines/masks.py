"""Instance-mask codecs and geometry: COCO RLE / polygons, PNG bytes, boxes, IoU.

Masks in memory are HxW bool arrays; their shard encoding is pipelines/shards/contract.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

# ---- COCO RLE (column-major runs, starting with a run of zeros): pycocotools is the codec ---------


def rle_encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE ({"size": [h, w], "counts": str}) of a bool mask."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_runs(mask: np.ndarray) -> list[int]:
    """The uncompressed COCO counts of a bool mask (pycocotools only writes the compressed form)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def rle_decode(rle: dict) -> np.ndarray:
    """Bool mask from a COCO RLE whose counts are a compressed string or a list of ints."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if not isinstance(counts, (str, bytes)):
        runs = [int(c) for c in counts]
        if sum(runs) != h * w or min(runs, default=0) < 0:
            raise ValueError(f"RLE runs {runs[:6]}... are not {h * w} pixels (size {h}x{w}) in runs >= 0")
        return _bool(mask_util.decode(mask_util.frPyObjects({"size": [h, w], "counts": runs}, h, w)))
    text = counts.encode("ascii") if isinstance(counts, str) else counts
    mask = _bool(mask_util.decode({"size": [h, w], "counts": text}))
    # pycocotools rejects runs past h*w but fills the pixels after runs that stop short with whatever
    # memory held (measured, 2.0.11): a well-formed string is the one the decoded mask encodes to.
    if mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"] != text:
        raise ValueError(f"RLE counts do not describe a {h}x{w} mask")
    return mask


def _bool(decoded: np.ndarray) -> np.ndarray:
    # pycocotools returns a Fortran-ordered uint8 array; masks in memory are C-ordered bool.
    return np.ascontiguousarray(decoded, dtype=bool)


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
