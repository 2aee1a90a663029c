from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.shards import write_shards


@pytest.fixture(scope="session")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {
        "train": write_shards(root / "train", shards=2, per_shard=6, seed=0, corrupt=1),
        "val": write_shards(root / "val", shards=1, per_shard=4, seed=1),
    }


@pytest.fixture(scope="session")
def toy_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy-world manifest listing the identities of the test shards (tests/training/shards.py): plain
    squares whose colours are the toy world's red, green, blue and yellow (within 30 in each channel)."""
    path = tmp_path_factory.mktemp("catalogue") / "manifest.json"
    path.write_text(json.dumps({"identities": [
        {"id": i, "shape": "square", "texture": "plain", "colour": c}
        for i, c in enumerate(("red", "green", "blue", "yellow"))]}))
    return path
