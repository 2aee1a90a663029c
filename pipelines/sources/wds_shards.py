"""Existing webdataset shards, e.g. img2dataset output: `<key>.jpg` + `<key>.txt` or `<key>.json`.

Each input tar becomes one output shard (img2dataset already sized them), so planning only lists
files. A json member may carry `caption`, `labels` and COCO-style `annotations`.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipelines.sources.base import image_record

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class WdsConfig:
    name: str
    path: str  # a glob of tar files, local or an fsspec URL: /data/laion/*.tar
    type: str = "webdataset"


class WdsSource:
    media = "image"

    def __init__(self, cfg: WdsConfig):
        self.cfg = cfg
        self.name = cfg.name

    def plan(self, units_per_shard: int) -> list[list[str]]:
        fs, _, paths = fsspec.get_fs_token_paths(self.cfg.path)
        urls = sorted(fs.unstrip_protocol(p) if "://" in self.cfg.path else p for p in paths)
        return [[url] for url in urls]

    def read(self, units: list[str]) -> Iterator[dict[str, Any]]:
        for url in units:
            yield from self._read_tar(url)

    def _read_tar(self, url: str) -> Iterator[dict[str, Any]]:
        name = url.rsplit("/", 1)[-1]
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                key, group = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    k, _, ext = base.partition(".")
                    if key is not None and k != key:
                        yield _record(f"{name}/{key}", group)
                        group = {}
                    key = k
                    group[ext.lower()] = tar.extractfile(member).read()
                if key is not None:
                    yield _record(f"{name}/{key}", group)
        except (OSError, tarfile.TarError, EOFError):
            # A truncated or corrupt input tar: what was read is kept; the rest counts as one input.
            yield image_record(f"{name}/<rest>", None, "read_error")


def _record(source_id: str, group: dict[str, bytes]) -> dict[str, Any]:
    data = next((group[e] for e in IMAGE_EXTS if e in group), None)
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    caption = group["txt"].decode("utf-8", "replace").strip() if "txt" in group else str(meta.get("caption", ""))
    reject = None if data is not None else "no_image_member"
    return image_record(source_id, data, reject, caption, meta.get("labels"), meta.get("annotations"))
