"""Stage 6b: write one shard: keys, the tar (temp name, then renamed), its per-input status table, then
its stats file (which marks the shard done). A shard that replaces a published one goes to staging."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipelines.batch import Batch, num_rows
from pipelines.shards.contract import sample_key
from pipelines.shards.status import status_rows, to_parquet
from pipelines.shards.storage import ShardStore


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime, owner and mode: a rebuilt shard is byte-identical to the first build.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (no second read of the tar)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def shard_stats(rows: Batch) -> dict[str, Any]:
    """Counts of one shard: every input is either written (>= 1 sample) or rejected with a reason."""
    n = num_rows(rows)
    rejects = rows.get("reject") or [None] * n
    members = rows.get("members") or [None] * n
    written = sum(1 for r, m in zip(rejects, members, strict=True) if r is None and m)
    # Rows that passed every stage yet produced no sample would break in = written + rejected.
    rejected = Counter(r if r is not None else "no_samples" for r, m in zip(rejects, members, strict=True)
                       if r is not None or not m)
    dropped = Counter(d for ds in rows.get("dropped") or [] if ds for d in ds)
    frames = Counter(r for rs in rows.get("frame_rejects") or [] if rs for r in rs if r)
    return {"inputs": n, "written": written, "rejected": dict(sorted(rejected.items())),
            "dropped": dict(sorted(dropped.items())), "frames_rejected": dict(sorted(frames.items()))}


@dataclass
class WriteShard:
    out_url: str

    def __call__(self, spec: dict[str, Any], rows: Batch, timings: dict[str, float]) -> dict[str, Any]:
        store = ShardStore(self.out_url)
        if spec.get("staged"):
            store = store.staging()
        shard, source = spec["shard"], spec["source"]
        keys, hashes = [], {}
        row_keys: list[list[str]] = []  # the keys of each input row, for the status table
        f, tmp = store.open_temp(shard, "tar")
        with f:
            hw = _HashingWriter(f)
            # webdataset layout: `<key>.<ext>` members, a sample's members contiguous (stdlib tarfile:
            # importing webdataset would pull torch into every worker).
            with tarfile.open(fileobj=hw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for sample_members in (rows.get("members") or [None] * num_rows(rows)):
                    row_keys.append([])
                    for members in sample_members or []:
                        key = sample_key(source, shard, len(keys))
                        keys.append(key)
                        row_keys[-1].append(key)
                        for ext, data in sorted(members.items()):
                            add_member(tar, f"{key}.{ext}", data)
                            hashes[f"{key}.{ext}"] = hashlib.sha256(data).hexdigest()
        store.publish(tmp, f"{shard:06d}.tar")
        stats = {"shard": shard, "kind": spec["kind"], "source": source, "params_hash": spec["params_hash"],
                 "pipeline_version": spec["pipeline_version"], "units_sha256": spec.get("units_sha256"), **shard_stats(rows), "samples": len(keys),
                 "tar_sha256": hw.sha.hexdigest(), "tar_bytes": hw.size, "member_sha256": hashes,
                 "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        store.write_bytes(shard, f"{shard:06d}.status.parquet", to_parquet(status_rows(rows, source, row_keys)))
        store.write_json(shard, f"{shard:06d}.stats.json", stats)  # last: this marks the shard done
        return stats
