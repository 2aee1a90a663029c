"""COCO-style instance annotations (polygons or RLE) over a folder of images."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipelines.sources.base import SourceError, chunk, image_record, read_bytes, require


@dataclass
class CocoConfig:
    name: str
    annotations: str  # the instances JSON
    images: str  # folder the `file_name`s are relative to
    type: str = "coco"


class CocoSource:
    media = "image"

    def __init__(self, cfg: CocoConfig):
        self.cfg = cfg
        self.name = cfg.name

    def plan(self, units_per_shard: int) -> list[list[dict[str, Any]]]:
        require(self.cfg.annotations, "annotations", "file")
        require(self.cfg.images, "images")
        try:
            with fsspec.open(self.cfg.annotations, "r") as f:
                coco = json.load(f)
            images = coco["images"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise SourceError(f"annotations: {self.cfg.annotations} is not a COCO instances JSON ({err!r})") from err
        categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
        per_image: dict[Any, list[dict]] = {img["id"]: [] for img in images}
        for ann in coco.get("annotations", []):
            ann = dict(ann)
            ann.setdefault("label", categories.get(ann.get("category_id"), "object"))
            per_image.setdefault(ann["image_id"], []).append(ann)
        units = []
        for img in sorted(images, key=lambda im: str(im["file_name"])):
            anns = sorted(per_image.get(img["id"], []), key=lambda a: a.get("id", 0))
            caption = img.get("caption") or _caption_from_labels([a["label"] for a in anns])
            # The annotations travel with the unit so workers never reload the (large) JSON.
            units.append({"file_name": img["file_name"], "caption": caption, "annotations": anns})
        return chunk(units, units_per_shard)

    def read(self, units: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for unit in units:
            data, reject = read_bytes(fsspec.open, os.path.join(self.cfg.images, unit["file_name"]))
            labels = sorted({a["label"] for a in unit["annotations"]}) or None
            yield image_record(unit["file_name"], data, reject, unit["caption"], labels, unit["annotations"])


def _caption_from_labels(labels: list[str]) -> str:
    if not labels:
        return ""
    return "a photo of " + " and ".join(f"a {label}" for label in sorted(set(labels)))
