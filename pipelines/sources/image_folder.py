"""A folder of images with a captions JSONL: one line per image, {"file": ..., "caption": ...}.

Optional per line: `labels` (for the `auto` annotator) and `annotations` (COCO-style dicts with
`label` and `segmentation`). Lines are read in file-name order, so the plan is deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipelines.sources.base import SourceError, chunk, image_record, read_bytes, require


@dataclass
class ImageFolderConfig:
    name: str
    path: str  # image folder
    captions: str = "captions.jsonl"  # relative to `path` unless absolute / a URL
    type: str = "image_folder"


class ImageFolderSource:
    media = "image"

    def __init__(self, cfg: ImageFolderConfig):
        self.cfg = cfg
        self.name = cfg.name

    def _captions_path(self) -> str:
        c = self.cfg.captions
        return c if os.path.isabs(c) or "://" in c else os.path.join(self.cfg.path, c)

    def plan(self, units_per_shard: int) -> list[list[dict[str, Any]]]:
        require(self.cfg.path, "path")
        require(self._captions_path(), "captions", "file")
        lines = []
        with fsspec.open(self._captions_path(), "r") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"captions: {self._captions_path()}:{n + 1}: not JSON ({err})") from err
                if not isinstance(entry, dict) or "file" not in entry:
                    raise SourceError(f"captions: {self._captions_path()}:{n + 1}: missing 'file'")
                lines.append(entry)
        lines.sort(key=lambda e: str(e["file"]))
        return chunk(lines, units_per_shard)

    def read(self, units: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for entry in units:
            data, reject = read_bytes(fsspec.open, os.path.join(self.cfg.path, entry["file"]))
            yield image_record(str(entry["file"]), data, reject, str(entry.get("caption", "")),
                               entry.get("labels"), entry.get("annotations"))
