"""Batches are dicts of equal-length lists (one entry per row).

Rows are never dropped by a stage: a stage that refuses a row sets its `reject` reason, and later
stages skip it. That keeps every input visible to the writer, which turns the reasons into stats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Batch = dict[str, list[Any]]


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def live_rows(batch: Batch) -> Iterator[int]:
    """Indices of rows no stage has rejected."""
    rejects = batch.get("reject") or [None] * num_rows(batch)
    return (i for i, reason in enumerate(rejects) if reason is None)


def ensure_column(batch: Batch, name: str, default: Any = None) -> list[Any]:
    if name not in batch:
        batch[name] = [default] * num_rows(batch)
    return batch[name]


def reject(batch: Batch, row: int, reason: str) -> None:
    ensure_column(batch, "reject")[row] = reason


def from_rows(rows: list[dict[str, Any]]) -> Batch:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    return {k: [row.get(k) for row in rows] for k in keys}


def to_rows(batch: Batch) -> list[dict[str, Any]]:
    return [{k: v[i] for k, v in batch.items()} for i in range(num_rows(batch))]


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def concat_batches(batches: list[Batch]) -> Batch:
    keys: list[str] = []
    for b in batches:
        keys.extend(k for k in b if k not in keys)
    out: Batch = {k: [] for k in keys}
    for b in batches:
        n = num_rows(b)
        for k in keys:
            out[k].extend(b.get(k, [None] * n))
    return out
