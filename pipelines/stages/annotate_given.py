"""Stage 2, `given`: subjects from the source's own annotations (COCO polygons / RLE), or alpha.

Produces the same `subjects` column as the `auto` annotator (annotate_auto.AutoAnnotator):
per row a list of {label, bbox [x0, y0, x1, y1] (pixels), score, mask (HxW bool)}; a source's
ground-truth `identity` is carried along when present (toyworld), so pairing can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.masks import mask_bbox, segmentation_to_mask
from pipelines.stages.resize import Geometry, identity_geometry

CARRIED_KEYS = ("identity",)


def subjects_from_annotations(anns: list[dict[str, Any]], geometry: Geometry) -> list[dict[str, Any]]:
    """Masks are given in the input's (display) coordinates; they follow the decoder's resize / crop."""
    subjects = []
    for ann in anns:
        if ann.get("iscrowd") or "segmentation" not in ann:
            continue  # crowd regions and box-only annotations give no instance mask
        mask = geometry.mask(segmentation_to_mask(ann["segmentation"], geometry.original_height,
                                                  geometry.original_width))
        box = mask_bbox(mask)
        if box is None:
            continue
        subject = {"label": str(ann.get("label", "object")), "bbox": box, "score": float(ann.get("score", 1.0)),
                   "mask": mask}
        subject.update({k: ann[k] for k in CARRIED_KEYS if k in ann})
        subjects.append(subject)
    return subjects


def subject_from_alpha(alpha: np.ndarray, label: str) -> list[dict[str, Any]]:
    mask = alpha > 127
    box = mask_bbox(mask)
    return [] if box is None else [{"label": label, "bbox": box, "score": 1.0, "mask": mask}]


@dataclass
class AnnotateGiven:
    """Images without annotations but with an alpha channel (cut-outs) get one subject from alpha."""

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "subjects")
        anns_col = batch.get("annotations") or [None] * len(batch["image"])
        geometries = batch.get("geometry") or [None] * len(batch["image"])
        for i in list(live_rows(batch)):
            h, w = batch["image"][i].shape[:2]
            anns = anns_col[i]
            try:
                if anns is not None:
                    batch["subjects"][i] = subjects_from_annotations(anns, geometries[i] or identity_geometry(w, h))
                elif batch.get("alpha") and batch["alpha"][i] is not None:
                    labels = batch.get("labels", [None] * len(batch["image"]))[i] or ["subject"]
                    batch["subjects"][i] = subject_from_alpha(batch["alpha"][i], labels[0])
                else:
                    batch["subjects"][i] = []
            except (ValueError, KeyError, TypeError, IndexError):
                reject(batch, i, "bad_annotation")
        return batch
