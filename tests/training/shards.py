"""Contract shards for the training tests: squares of distinct colours on noise, with exact masks and
references cut from the target, encoded by the pipeline's own encoder (pipelines/stages/encode.py,
which follows pipelines/shards/contract.py) and written with webdataset's TarWriter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from pipelines.config import ShardsConfig
from pipelines.shards.contract import sample_key
from pipelines.stages.encode import sample_members

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40)]


def _sample(rng: np.random.Generator, size: int, n: int) -> dict[str, bytes]:
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
    sample = {"image": image, "caption": "things on noise", "subjects": subjects, "source_id": "x",
              "passthrough": None}
    return sample_members(sample, "test", "unpaired", "test", ShardsConfig(image_format="png"))


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
                sink.write({"__key__": sample_key("test", shard, index), **members})
        stats = {"inputs": per_shard, "written": per_shard, "rejected": {}}
        (folder / f"{shard:06d}.stats.json").write_text(json.dumps(stats))
    return folder
