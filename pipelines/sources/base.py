"""What every source provides: a cheap, deterministic plan of shard units, and a reader of units.

`plan` runs once on the driver and must be cheap (list files, count rows); `read` runs on workers
and does the I/O. A record is a plain dict:
  source_id: str, caption: str, labels: list[str] | None,
  data: bytes | None (the encoded image or video file), reject: str | None (read failure),
  annotations: list[dict] | None   (images: COCO-style dicts with `label`, `segmentation`, ...)
  frame_annotations: dict[int, list[dict]] | None   (videos: per decoded frame index)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

Media = Literal["image", "video"]


class Source(Protocol):
    name: str
    media: Media

    def plan(self, units_per_shard: int) -> list[list[Any]]:
        """Units (small, picklable) grouped into shards, in a deterministic order."""
        ...

    def read(self, units: list[Any]) -> Iterator[dict[str, Any]]:
        """Records for the units of one shard, in order."""
        ...


class SourceError(ValueError):
    """A source that cannot be planned; the message starts with the config key at fault
    (`images: /data/coco/images does not exist`), which the build prefixes with the source's path."""


def require(url: str, key: str, kind: str = "folder") -> None:
    """`url` (a path or fsspec URL, the value of config key `key`) must exist as a folder or file."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    ok = fs.isdir(path) if kind == "folder" else fs.isfile(path)
    if not ok:
        what = "is not a folder" if kind == "folder" and fs.exists(path) else "does not exist"
        raise SourceError(f"{key}: {url} {what}")


def chunk(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def read_bytes(fs_open, path: str) -> tuple[bytes | None, str | None]:
    """File bytes, or a rejection reason: a missing or unreadable file is a counted input, not a crash."""
    try:
        with fs_open(path, "rb") as f:
            return f.read(), None
    except OSError:
        return None, "read_error"


def image_record(source_id: str, data: bytes | None, reject: str | None, caption: str = "",
                 labels: list[str] | None = None, annotations: list[dict] | None = None) -> dict[str, Any]:
    return {"source_id": source_id, "data": data, "reject": reject, "caption": caption,
            "labels": labels, "annotations": annotations}
