"""Output storage: a local path, a path on a network filesystem, or any fsspec URL (file://, s3://, ...).

Publication rule, the same everywhere: a tar is written under a hidden temporary name and moved to
`NNNNNN.tar` only when closed; `NNNNNN.stats.json` is written (also via a temporary name) after it.
A shard is done only when its stats file exists, so a reader listing stats files never sees a partial
shard, and a killed build leaves at most temporary files, which the next run removes.
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from typing import Any

import fsspec

STATS_RE = re.compile(r"^(\d{6})\.stats\.json$")
TMP_RE = re.compile(r"^\.(\d{6})\.(tar|stats\.json)\.[0-9a-f]+\.tmp$")


class ShardStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

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
        tmp = self.path(f".{shard:06d}.{suffix}.{uuid.uuid4().hex}.tmp")
        return self.fs.open(tmp, "wb"), tmp

    def publish(self, tmp: str, name: str) -> None:
        # Local and network filesystems: an atomic rename over any older file. Object stores: the
        # final object appears whole when the copy completes.
        self.fs.mv(tmp, self.path(name))

    def write_json(self, shard: int, name: str, data: dict[str, Any]) -> None:
        f, tmp = self.open_temp(shard, "stats.json")
        with f:
            f.write(json.dumps(data, indent=1, sort_keys=True).encode())
        self.publish(tmp, name)

    def remove(self, name: str) -> None:
        p = self.path(name)
        if self.fs.exists(p):
            self.fs.rm(p)

    def clean_temps(self, shards: set[int]) -> list[str]:
        """Remove temporary files a killed run left for the given (not done) shards."""
        removed = []
        for name in self.names():
            m = TMP_RE.match(name)
            if m and int(m.group(1)) in shards:
                self.fs.rm(self.path(name))
                removed.append(name)
        return removed
