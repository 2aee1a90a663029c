"""Contract shards for the training tests, written by the pipeline itself: sample rows of squares of
distinct colours on noise (exact masks, references cut from the target as the pipeline's refs stage
cuts them: `ref_from: "self"`) go through the pipeline's encode stage (pipelines/stages/encode.py)
and its shard writer (pipelines/shards/writer.py: tar, status table, stats), as a build writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import PIPELINE_VERSION, ShardsConfig
from pipelines.shards.writer import WriteShard
from pipelines.stages.encode import EncodeSamples

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40)]
SOURCE, KIND, PARAMS_HASH = "test", "unpaired", "test"


def _row(rng: np.random.Generator, size: int, n: int, source_id: str) -> dict[str, Any]:
    image = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    subjects = []
    side = size // 3
    corners = [(2, 2), (2, size - side - 2), (size - side - 2, 2), (size - side - 2, size - side - 2)]
    for i in range(n):
        top, left = corners[i]
        mask = np.zeros((size, size), dtype=bool)
        mask[top : top + side, left : left + side] = True
        image[mask] = COLOURS[i]
        subjects.append({"label": f"thing{i}", "bbox": [left, top, left + side, top + side], "score": 1.0,
                         "area_frac": float(mask.mean()), "ref_from": "self", "identity": i, "mask": mask})
    for s, (top, left) in zip(subjects, corners, strict=False):
        s["ref"] = image[top - 2 : top + side + 2, left - 2 : left + side + 2].copy()
        s["refmask"] = np.zeros(s["ref"].shape[:2], dtype=bool)
        s["refmask"][2:-2, 2:-2] = True
    return {"image": image, "caption": "things on noise", "subjects": subjects, "source_id": source_id,
            "passthrough": None}


def write_shards(folder: Path, shards: int = 2, per_shard: int = 6, size: int = 64, seed: int = 0,
                 corrupt: int = 0) -> Path:
    """Write complete shards (tar, status table, stats) into `folder`; `corrupt` samples per shard
    get an undecodable target image (the bytes a damaged file would have)."""
    rng = np.random.default_rng(seed)
    encode = EncodeSamples(SOURCE, KIND, PARAMS_HASH, ShardsConfig(image_format="png"))
    write = WriteShard(str(folder))
    for shard in range(shards):
        rows = [_row(rng, size, n=1 + (index % 3), source_id=f"{shard}-{index}") for index in range(per_shard)]
        batch = encode({name: [row[name] for row in rows] for name in rows[0]})
        for members in batch["members"][:corrupt]:
            members[0]["png"] = b"not an image"
        spec = {"shard": shard, "source": SOURCE, "kind": KIND, "params_hash": PARAMS_HASH,
                "pipeline_version": PIPELINE_VERSION}
        write(spec, batch, timings={})
    return folder
