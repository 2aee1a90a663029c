"""Contract shards for the training tests, written with webdataset's own TarWriter: squares and
discs of distinct colours on noise, with exact masks and references cut from the target."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _sample(rng: np.random.Generator, size: int, n: int) -> dict[str, bytes]:
    image = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    members: dict[str, bytes] = {}
    subjects = []
    side = size // 3
    corners = [(2, 2), (2, size - side - 2), (size - side - 2, 2), (size - side - 2, size - side - 2)]
    for i in range(n):
        top, left = corners[i]
        mask = np.zeros((size, size), dtype=bool)
        mask[top : top + side, left : left + side] = True
        image[mask] = COLOURS[i]
        members[f"sub{i}.mask.png"] = _png(mask.astype(np.uint8) * 255)
        subjects.append({"label": f"thing{i}", "bbox": [left, top, left + side, top + side], "score": 1.0,
                         "area_frac": float(mask.mean()), "ref_from": "target", "identity": i})
    for i in range(n):
        top, left = corners[i]
        ref = image[top - 2 : top + side + 2, left - 2 : left + side + 2].copy()
        refmask = np.zeros(ref.shape[:2], dtype=np.uint8)
        refmask[2:-2, 2:-2] = 255
        members[f"sub{i}.ref.png"] = _png(ref)
        members[f"sub{i}.refmask.png"] = _png(refmask)
    members["png"] = _png(image)
    members["json"] = json.dumps({"caption": "things on noise", "width": size, "height": size, "source": "test",
                                  "source_id": "x", "kind": "unpaired", "subjects": subjects}).encode()
    return members


def write_shards(folder: Path, shards: int = 2, per_shard: int = 6, size: int = 64, seed: int = 0,
                 corrupt: int = 0) -> Path:
    """Write complete shards (tar + stats) into `folder`; `corrupt` samples per shard get an
    undecodable target image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as sink:
            for index in range(per_shard):
                members = _sample(rng, size, n=1 + (index % 3))
                if index < corrupt:
                    members["png"] = b"not an image"
                sink.write({"__key__": f"test-{shard:06d}-{index:06d}", **members})
        stats = {"inputs": per_shard, "written": per_shard, "rejected": {}}
        (folder / f"{shard:06d}.stats.json").write_text(json.dumps(stats))
    return folder
