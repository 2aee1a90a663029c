"""Replacing published shards through staging: a publication killed half-way finishes on the next
run, and the result is the shards a clean build of the same params gives."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.build import BuildError, run_build
from pipelines.config import parse_data_config
from tests.pipelines.helpers import toy_params


def files(folder) -> dict[str, object]:
    """Published files: bytes, and for stats their content less the timings (which vary by run)."""
    out: dict[str, object] = {}
    for n in sorted(os.listdir(folder)):
        if n.endswith(".stats.json"):
            out[n] = {k: v for k, v in json.loads((folder / n).read_text()).items() if k != "timings_s"}
        elif not n.startswith("."):
            out[n] = (folder / n).read_bytes()
    return out


def test_a_publication_killed_half_way_completes_on_the_next_run(tmp_path, toy_dir):
    out = tmp_path / "out"
    run_build(parse_data_config(toy_params(toy_dir, out)["data"]), "unpaired", str(out), "local")
    stricter = parse_data_config(toy_params(toy_dir, out, filter__min_area_frac=0.05)["data"])
    with pytest.raises(BuildError, match="--prune"):
        run_build(stricter, "unpaired", str(out), "local")  # refused: every new shard waits in staging
    folder, staging = out / "unpaired", out / "unpaired" / ".staging"
    assert sorted(os.listdir(staging)) == sorted(files(folder))  # the same shard numbers, staged
    # A --prune run killed while moving shard 0 into place: its old stats gone, its new tar moved.
    os.remove(folder / "000000.stats.json")
    os.replace(staging / "000000.tar", folder / "000000.tar")

    resumed = run_build(stricter, "unpaired", str(out), "local", prune=True)
    assert resumed.stats == []  # nothing rebuilt: every shard came from staging
    assert not staging.exists()
    reference = tmp_path / "reference"
    run_build(stricter, "unpaired", str(reference), "local")
    assert files(folder) == files(reference / "unpaired")
