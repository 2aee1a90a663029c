"""A folder of videos (mp4, webm, mkv, mov, avi). An optional sidecar `<stem>.json` next to a video
gives `caption`, `labels` and per-frame COCO-style instance annotations:
  {"caption": ..., "frames": [{"index": <decoded frame index>, "annotations": [...]}, ...]}
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipelines.sources.base import chunk, read_bytes, require

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


@dataclass
class VideoFolderConfig:
    name: str
    path: str
    type: str = "video_folder"


class VideoFolderSource:
    media = "video"

    def __init__(self, cfg: VideoFolderConfig):
        self.cfg = cfg
        self.name = cfg.name

    def plan(self, units_per_shard: int) -> list[list[str]]:
        require(self.cfg.path, "path")
        fs, root = fsspec.core.url_to_fs(self.cfg.path)
        names = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False)
                       if p.lower().endswith(VIDEO_EXTS))
        return chunk(names, units_per_shard)

    def read(self, units: list[str]) -> Iterator[dict[str, Any]]:
        fs, root = fsspec.core.url_to_fs(self.cfg.path)
        for name in units:
            data, reject = read_bytes(fs.open, posixpath.join(root, name))
            side = _sidecar(fs, posixpath.join(root, name.rsplit(".", 1)[0] + ".json"))
            frames = None
            if "frames" in side:
                frames = {int(f["index"]): list(f.get("annotations", [])) for f in side["frames"]}
            yield {"source_id": name, "data": data, "reject": reject, "caption": str(side.get("caption", "")),
                   "labels": side.get("labels"), "frame_annotations": frames}


def _sidecar(fs, path: str) -> dict[str, Any]:
    if not fs.exists(path):
        return {}
    try:
        with fs.open(path, "r") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
