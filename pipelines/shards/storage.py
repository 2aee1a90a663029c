"""Output storage: a local path, a path on a network filesystem, or any fsspec URL (file://, s3://, ...).

Publication rule, the same everywhere: a tar is written under a hidden temporary name and moved to
`NNNNNN.tar` only when closed; `NNNNNN.status.parquet` (one row per input) follows the same way, and
`NNNNNN.stats.json` is written (also via a temporary name) last. A shard is done only when its stats
file exists, so a reader listing stats files never sees a partial shard, and a killed build leaves at
most temporary files, which the next run removes.

A shard that would replace a published one is first written to `.staging/` next to it; the build
moves it into place only once the whole kind is built and checked (pipelines/build.py).
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from typing import Any

import fsspec

STATS_RE = re.compile(r"^(\d{6})\.stats\.json$")
TMP_RE = re.compile(r"^\.(\d{6})\.(tar|stats\.json|status\.parquet)\.[0-9a-f]+\.tmp$")
STAGING = ".staging"


def shard_files(shard: int) -> tuple[str, ...]:
    """A shard's published files, the stats file first: removing or replacing them in this order never
    leaves a shard that counts as done without its tar."""
    return (f"{shard:06d}.stats.json", f"{shard:06d}.status.parquet", f"{shard:06d}.tar")


class ShardStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def staging(self) -> ShardStore:
        """The store where shards that replace published ones wait until the build is checked."""
        return ShardStore(posixpath.join(self.url.rstrip("/"), STAGING))

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))

    def done(self) -> dict[int, dict[str, Any]]:
        """Stats of every published shard, by shard number."""
        out = {}
        for name in self.names():
            m = STATS_RE.match(name)
            if m:
                with self.fs.open(self.path(name), "r") as f:
                    out[int(m.group(1))] = json.load(f)
        return out

    def open_temp(self, shard: int, suffix: str):
        """A writable file under a unique hidden name; returns (file, temp path)."""
        self.makedirs()
        tmp = self.path(f".{shard:06d}.{suffix}.{uuid.uuid4().hex}.tmp")
        return self.fs.open(tmp, "wb"), tmp

    def publish(self, tmp: str, name: str) -> None:
        # Local and network filesystems: an atomic rename over any older file. Object stores: the
        # final object appears whole when the copy completes.
        self.fs.mv(tmp, self.path(name))

    def write_bytes(self, shard: int, name: str, data: bytes) -> None:
        suffix = name.split(".", 1)[1]  # "stats.json", "status.parquet"
        f, tmp = self.open_temp(shard, suffix)
        with f:
            f.write(data)
        self.publish(tmp, name)

    def write_json(self, shard: int, name: str, data: dict[str, Any]) -> None:
        self.write_bytes(shard, name, json.dumps(data, indent=1, sort_keys=True).encode())

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def remove(self, name: str) -> None:
        p = self.path(name)
        if self.fs.exists(p):
            self.fs.rm(p)

    def move_shard_from(self, other: ShardStore, shard: int) -> None:
        """Replace shard `shard` here by the one in `other` (same filesystem: renames). The old stats
        go first, the new stats come last, so the shard never counts as done half-replaced."""
        stats, *rest = shard_files(shard)
        self.remove(stats)
        for name in rest:
            if other.exists(name):  # absent: already moved by a run killed half-way through this
                self.fs.mv(other.path(name), self.path(name))
        self.fs.mv(other.path(stats), self.path(stats))

    def clean_temps(self, shards: set[int]) -> list[str]:
        """Remove temporary files a killed run left for the given (not done) shards."""
        removed = []
        for name in self.names():
            m = TMP_RE.match(name)
            if m and int(m.group(1)) in shards:
                self.fs.rm(self.path(name))
                removed.append(name)
        return removed
