"""Shared fixtures' helpers: a small toyworld, params pointing at it, reading shards back."""

from __future__ import annotations

import copy
import glob
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

SMALL_TOYWORLD = {"num_images": 24, "image_size": 96, "num_videos": 6, "video_size": 96, "video_fps": 8,
                  "video_seconds": 2.0, "num_identities": 12, "seed": 3}


def base_params() -> dict[str, Any]:
    with open(REPO / "params.yaml") as f:
        return yaml.safe_load(f)


def toy_params(toy_dir: str | Path, out_dir: str | Path, **data_overrides: Any) -> dict[str, Any]:
    """The repo's params.yaml, pointed at a test toyworld and output folder, with small shards."""
    params = copy.deepcopy(base_params())
    data = params["data"]
    data["out_dir"] = str(out_dir)
    data["toyworld"].update(SMALL_TOYWORLD, out_dir=str(toy_dir))
    data["sources"] = {
        "unpaired": [{"type": "coco", "name": "toyworld", "annotations": f"{toy_dir}/images/annotations.json",
                      "images": f"{toy_dir}/images"}],
        "paired": [{"type": "video_folder", "name": "toyvideo", "path": f"{toy_dir}/videos"}],
    }
    data["shards"].update(images_per_shard=6, videos_per_shard=2)
    data["ray"]["num_cpus"] = 2
    for dotted, value in data_overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return params


def write_params(path: str | Path, params: dict[str, Any]) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(params, f, sort_keys=False)
    return str(path)


def read_samples(folder: str | Path) -> list[dict[str, Any]]:
    """Every sample of the published shards in `folder`, read with the plain webdataset reader."""
    urls = sorted(glob.glob(os.path.join(folder, "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else []


def read_stats(folder: str | Path) -> dict[int, dict[str, Any]]:
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "*.stats.json"))):
        with open(p) as f:
            out[int(os.path.basename(p)[:6])] = json.load(f)
    return out


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def jpeg_bytes(array: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **kw)
    return buf.getvalue()
