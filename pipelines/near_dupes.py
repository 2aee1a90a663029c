"""Near-duplicate images across the whole build, by perceptual hash (imagehash.phash, 64 bits).

A planning pass before the shards are built: every image of the plan is hashed (JPEGs decoded at
1/8 scale: a 64-bit DCT hash looks at 32x32 pixels), then, in plan order, an image whose hash is
within `data.filter.near_dupe_max_distance` bits of an earlier kept image's is listed as a
near-duplicate of it. Each shard's spec carries its list (`near_duplicates`: source ids), which
the `near_dupes` stage rejects as `near_duplicate`; the list is part of the shard's input digest,
so a shard whose list changes is redone, and the first occurrence always stays. The same plan
gives the same lists, whatever runs the shards and in what order. Hashes are cached per shard
(`<out>/<kind>/.near_dupes/`, keyed by the shard's input digest), so a rerun hashes only new or
changed shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import imagehash
from PIL import Image, ImageOps

from pipelines.config import DataConfig
from pipelines.shards.storage import ShardStore
from pipelines.sources import build_source
from pipelines.stages.decode import Rejected, check_size, to_rgb_alpha

HASH_BITS = 64


def phash_bytes(data: bytes | None, cfg: DataConfig) -> int | None:
    """The 64-bit perceptual hash of an encoded image as shown (EXIF orientation applied); None for
    what the decoder would reject (the shard build names the reason)."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            check_size(im.width, im.height, cfg.decode)
            im.draft("RGB", (64, 64))  # JPEG: decode at a fraction of the size, enough for a 32x32 DCT
            im = ImageOps.exif_transpose(im)
            rgb, _ = to_rgb_alpha(im)
    except (Rejected, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return int(str(imagehash.phash(Image.fromarray(rgb))), 16)


class NearDuplicateIndex:
    """Hashes seen so far; finds one within `max_distance` bits without comparing against all of them.

    Pigeonhole: split the 64 bits into max_distance + 1 blocks; two hashes that differ in at most
    max_distance bits agree exactly on at least one block, so one dict lookup per block finds every
    candidate.
    """

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        n = max_distance + 1
        bounds = [round(i * HASH_BITS / n) for i in range(n + 1)]
        self.blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.blocks]

    def find(self, h: int) -> int | None:
        """A stored hash within max_distance of h, or None."""
        for (shift, mask), table in zip(self.blocks, self.tables, strict=True):
            for other in table.get((h >> shift) & mask, ()):
                if (h ^ other).bit_count() <= self.max_distance:
                    return other
        return None

    def add(self, h: int) -> None:
        for (shift, mask), table in zip(self.blocks, self.tables, strict=True):
            table.setdefault((h >> shift) & mask, []).append(h)


def _shard_hashes(spec: dict[str, Any], cfg: DataConfig, cache: ShardStore) -> list[tuple[str, int | None]]:
    key = hashlib.sha256(json.dumps([spec["units_sha256"], "phash", imagehash.__version__],
                                    sort_keys=True).encode()).hexdigest()[:16]
    name = f"{spec['shard']:06d}.phash.json"
    if cache.exists(name):
        with cache.fs.open(cache.path(name), "r") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return [(sid, h) for sid, h in cached["hashes"]]
    hashes = [(r["source_id"], phash_bytes(r["data"], cfg))
              for r in build_source(spec["source_cfg"]).read(spec["units"])]
    cache.write_json(spec["shard"], name, {"key": key, "hashes": hashes})
    return hashes


def mark_near_duplicates(cfg: DataConfig, kind: str, specs: list[dict[str, Any]], out: str
                         ) -> list[dict[str, Any]]:
    """`specs` with `near_duplicates` (source ids) set and folded into `units_sha256`; unchanged
    when the check is off or the kind is not images."""
    if kind != "unpaired" or cfg.filter.near_dupe_max_distance is None:
        return specs
    cache = ShardStore(posixpath.join(out, ".near_dupes"))
    cache.makedirs()
    # Threads: Pillow decodes and imagehash's DCT release the GIL for most of their work.
    with ThreadPoolExecutor(max_workers=cfg.ray.num_cpus or os.cpu_count() or 1) as pool:
        per_shard = list(pool.map(lambda s: _shard_hashes(s, cfg, cache), specs))
    index = NearDuplicateIndex(cfg.filter.near_dupe_max_distance)
    out_specs = []
    for spec, hashes in zip(specs, per_shard, strict=True):
        dupes = []
        for source_id, h in hashes:
            if h is None:
                continue
            if index.find(h) is not None:
                dupes.append(source_id)
            else:
                index.add(h)
        digest = hashlib.sha256(json.dumps([spec["units_sha256"], dupes]).encode()).hexdigest()[:16]
        out_specs.append(dict(spec, near_duplicates=dupes, units_sha256=digest))
    return out_specs
