"""The per-input status table of a shard, `NNNNNN.status.parquet`: every input by name, with what
became of it (like img2dataset's per-shard parquet).

One row per input: `input_id` (the source's id: file name, `tar/key`, `row<N>`, video name), `source`,
`status` (`ok`, or the rejection reason the stats count), `detail` (why, where known: the stage's
message, subjects and pair candidates dropped by reason, frames rejected by reason), `keys` (the
sample keys it became; a video can give several), `width` / `height` (the decoded input's size, before any resize; null
when it never decoded).
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.batch import Batch, num_rows
from pipelines.shards.storage import ShardStore

SCHEMA = pa.schema([
    ("input_id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("detail", pa.string()),
    ("keys", pa.list_(pa.string())), ("width", pa.int32()), ("height", pa.int32()),
])
OK = "ok"


def _counts(label: str, reasons: list[Any] | None) -> str | None:
    c = Counter(r for r in reasons or [] if r)
    return f"{label}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())) if c else None


def _size(rows: Batch, i: int, names: tuple[str, ...]) -> int | None:
    # The original size when a decode stage keeps one apart from the (possibly resized) image.
    for name in names:
        value = (rows.get(name) or [None] * (i + 1))[i]
        if value is not None:
            return int(value)
    return None


def status_rows(rows: Batch, source: str, keys: list[list[str]]) -> list[dict[str, Any]]:
    """One status row per input row; `keys[i]` are the sample keys row i became."""
    n = num_rows(rows)
    col = lambda name: rows.get(name) or [None] * n  # noqa: E731 - a missing column is all None
    rejects, details, ids = col("reject"), col("reject_detail"), col("source_id")
    dropped, frames = col("dropped"), col("frame_rejects")
    out = []
    for i in range(n):
        status = rejects[i] if rejects[i] is not None else (OK if keys[i] else "no_samples")
        parts = [details[i], _counts("dropped", dropped[i]), _counts("frames rejected", frames[i])]
        out.append({"input_id": str(ids[i]), "source": source, "status": status,
                    "detail": "; ".join(p for p in parts if p) or None, "keys": keys[i],
                    "width": _size(rows, i, ("orig_width", "width")),
                    "height": _size(rows, i, ("orig_height", "height"))})
    return out


def to_parquet(records: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), buf)
    return buf.getvalue()


def read_status(url: str) -> list[dict[str, Any]]:
    """The status rows (plus `shard`) of every done shard (one with a stats file) under a path or
    fsspec URL, in shard order."""
    store = ShardStore(url)
    out = []
    for shard in sorted(store.done()):
        name = f"{shard:06d}.status.parquet"
        if store.exists(name):  # shards of an older build may predate the table
            with store.fs.open(store.path(name), "rb") as f:
                out.extend(dict(r, shard=shard) for r in pq.read_table(f, use_threads=False).to_pylist())
    return out
