from __future__ import annotations

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
