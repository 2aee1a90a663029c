"""Replacing published shards through staging: a build that loses inputs under the same params is
refused with its new shards staged, and a `--prune` publication killed half-way finishes on the next
run, to the shards a clean build of the same inputs gives."""

from __future__ import annotations

import json
import os
import shutil

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
    toy = tmp_path / "toy"
    shutil.copytree(f"{toy_dir}/images", toy / "images")
    out = tmp_path / "out"
    cfg = parse_data_config(toy_params(toy, out)["data"])
    run_build(cfg, "unpaired", str(out), "local")
    folder, staging = out / "unpaired", out / "unpaired" / ".staging"
    published = files(folder)
    # The first 6 images leave the listing: every shard moves up by 6 inputs, the last one goes.
    coco_path = toy / "images" / "annotations.json"
    coco = json.loads(coco_path.read_text())
    gone = {img["id"] for img in sorted(coco["images"], key=lambda im: im["file_name"])[:6]}
    coco["images"] = [img for img in coco["images"] if img["id"] not in gone]
    coco_path.write_text(json.dumps(coco))
    with pytest.raises(BuildError, match=r"\(shards 000003 would go\).*--prune"):
        run_build(cfg, "unpaired", str(out), "local")
    assert files(folder) == published
    assert sorted(os.listdir(staging)) == sorted(n for n in published if not n.startswith("000003"))
    # A --prune run killed while moving shard 0 into place: its old stats gone, its new tar moved.
    os.remove(folder / "000000.stats.json")
    os.replace(staging / "000000.tar", folder / "000000.tar")

    resumed = run_build(cfg, "unpaired", str(out), "local", prune=True)
    assert resumed.stats == []  # nothing rebuilt: every shard came from staging
    assert [r[0] for r in resumed.replaced] == [1, 2] and {r[3] for r in resumed.replaced} == {"inputs changed"}
    assert not staging.exists()
    reference = tmp_path / "reference"
    run_build(cfg, "unpaired", str(reference), "local")
    assert files(folder) == files(reference / "unpaired")
