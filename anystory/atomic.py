"""Atomic file writes for files that several processes (ranks, loader workers) may write or read
at once: a reader sees the previous file or the whole new one, never a part of it."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a uniquely named temporary file in the same folder (so the
    rename stays on one filesystem), then `os.replace` it over `path`. Concurrent writers of the
    same content are harmless: the last rename wins and every reader sees a complete file."""
    path = Path(path)
    # A unique name per writer ("x": never someone else's file); opened normally so the umask applies.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not publish a file whose bytes are not yet on disk
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path
