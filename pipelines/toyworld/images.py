"""Toyworld still images: JPEG/PNG files plus one COCO-style instances JSON."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from pipelines.masks import mask_bbox, rle_encode, rle_runs
from pipelines.toyworld.catalogue import SHAPES, Identity
from pipelines.toyworld.render import Placement, background, caption, compose, polygon


def place(rng: np.random.Generator, identities: list[Identity], size: int, scale: tuple[float, float],
          multi_scale: tuple[float, float], tries: int = 30) -> list[Placement]:
    """Random placements in which every subject keeps at least 40% of itself visible; radii are drawn
    from `scale` (one subject) or `multi_scale` (several), as fractions of `size`."""
    low, high = scale if len(identities) == 1 else multi_scale
    for _ in range(tries):
        ps = []
        for ident in identities:
            r = rng.uniform(low, high) * size
            ps.append(Placement(ident, rng.uniform(r, size - r), rng.uniform(r, size - r), r,
                                rng.uniform(0, 2 * np.pi)))
        _, visible, full = compose(np.zeros((size, size, 3), np.uint8), ps)
        if all(v.sum() >= 0.4 * f.sum() > 0 for v, f in zip(visible, full, strict=True)):
            return ps
    return ps[:1]


def segmentation(ann_index: int, p: Placement, visible: np.ndarray, full: np.ndarray) -> object:
    """Polygons for unoccluded subjects, RLE otherwise (string counts, every third as a count list)."""
    if np.array_equal(visible, full):
        return [polygon(p).ravel().tolist()]
    rle = rle_encode(visible)
    if ann_index % 3 == 0:
        rle = {"size": rle["size"], "counts": rle_runs(visible)}
    return rle


def write_images(out_dir: str, cat: list[Identity], num: int, size: int, max_subjects: int, seed: int,
                 png_fraction: float, jpeg_quality: int, empty_fraction: float, caption_style: str,
                 scale: tuple[float, float], multi_scale: tuple[float, float]) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    for image_id in range(num):
        n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_subjects + 1))
        idents = [cat[i] for i in rng.choice(len(cat), size=n, replace=False)] if n else []
        placements = place(rng, idents, size, scale, multi_scale) if n else []
        img, visible, full = compose(background(rng, size), placements)
        ext = "png" if rng.random() < png_fraction else "jpg"
        name = f"{image_id:06d}.{ext}"
        params = {"quality": jpeg_quality} if ext == "jpg" else {}
        Image.fromarray(img).save(os.path.join(out_dir, name), **params)
        coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size,
                               "caption": caption([p.identity for p in placements], caption_style)})
        for p, v, f in zip(placements, visible, full, strict=True):
            ann_id = len(coco["annotations"])
            seg = segmentation(ann_id, p, v, f)
            # The mask that a reader gets back from `seg`, so bbox and area match it exactly.
            exact = v if isinstance(seg, dict) else f
            x0, y0, x1, y1 = mask_bbox(exact)
            coco["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(p.identity.shape) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(exact.sum()), "iscrowd": 0,
                "segmentation": seg, "identity": p.identity.id,
            })
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(coco, f)
    return {"images": num, "annotations": len(coco["annotations"])}


__all__ = ["write_images"]
