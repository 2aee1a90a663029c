"""Published shards are never lost to bad input: the real CLI (`--runner local`, the same stages as
Ray's) against a build whose inputs are broken afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.pipelines.helpers import read_samples, toy_params, write_params
from tests.pipelines.processes import REPO, child_env


def cli(pfile: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/build_shards.py", "--params", pfile, "--runner", "local",
                           *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def published(folder) -> dict[str, bytes]:
    """Every published file (not the hidden staging area) with its bytes."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if not n.startswith(".")}


def test_a_source_whose_inputs_all_fail_changes_nothing(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "out")
    pfile = write_params(tmp_path / "params.yaml", params)
    first = cli(pfile, "--kind", "unpaired")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "out" / "unpaired"
    before = published(folder)
    n_images = len(json.loads(open(f"{toy_dir}/images/annotations.json").read())["images"])
    assert read_samples(folder)

    # The images folder is there but empty (a mount that did not come up): every input is a read error.
    empty = tmp_path / "empty_images"
    empty.mkdir()
    params["data"]["sources"]["unpaired"][0]["images"] = str(empty)
    broken = cli(write_params(tmp_path / "broken.yaml", params), "--kind", "unpaired")
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == [
        f"error: data.sources.unpaired[0] ('toyworld'): all {n_images} inputs failed (read_error={n_images});"
        " nothing published was changed"]
    assert published(folder) == before

    # The images folder does not exist at all: found while planning, before any work.
    params["data"]["sources"]["unpaired"][0]["images"] = str(tmp_path / "gone")
    missing = cli(write_params(tmp_path / "missing.yaml", params), "--kind", "unpaired")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines() == [f"error: data.sources.unpaired[0].images: {tmp_path}/gone does not exist"]
    assert published(folder) == before


def test_a_first_build_whose_inputs_all_fail_leaves_no_shards(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "out")
    empty = tmp_path / "empty_images"
    empty.mkdir()
    params["data"]["sources"]["unpaired"][0]["images"] = str(empty)
    proc = cli(write_params(tmp_path / "p.yaml", params), "--kind", "unpaired")
    assert proc.returncode == 1 and "all " in proc.stderr and "read_error=" in proc.stderr
    assert published(tmp_path / "out" / "unpaired") == {}


def test_fewer_videos_need_prune_and_the_summary_names_what_went(tmp_path, toy_dir):
    videos = tmp_path / "videos"
    shutil.copytree(f"{toy_dir}/videos", videos)
    params = toy_params(toy_dir, tmp_path / "out")
    params["data"]["sources"]["paired"][0]["path"] = str(videos)
    pfile = write_params(tmp_path / "params.yaml", params)
    assert cli(pfile, "--kind", "paired").returncode == 0
    folder = tmp_path / "out" / "paired"
    before = published(folder)
    clips = sorted(n for n in os.listdir(videos) if n.endswith(".mp4"))
    assert len(clips) == 6 and sorted(n for n in before if n.endswith(".tar")) == [
        "000000.tar", "000001.tar", "000002.tar"]  # 2 videos per shard
    kept = [clips[0], clips[2]]  # shard 0 is redone with other videos; shards 1 and 2 have no inputs left
    for name in clips:
        if name not in kept:
            for path in videos.glob(name.rsplit(".", 1)[0] + ".*"):
                path.unlink()

    refused = cli(pfile, "--kind", "paired")
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: paired source 'toyvideo': this build would publish ")
    assert "(shards 000001, 000002 would go)" in line and line.endswith("rerun with --prune to accept")
    assert published(folder) == before

    pruned = cli(pfile, "--kind", "paired", "--prune")
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    removed = [line.strip() for line in pruned.stdout.splitlines() if line.strip().startswith("removed ")]
    assert removed == [f"removed {n:06d}.{ext}: not in the plan any more: source 'toyvideo' now has 1 shard(s)"
                       for n in (1, 2) for ext in ("stats.json", "status.parquet", "tar")]
    assert any(line.strip().startswith("replaced shard 000000: ") for line in pruned.stdout.splitlines())
    assert sorted(published(folder)) == ["000000.stats.json", "000000.status.parquet", "000000.tar"]
    assert not (folder / ".staging").exists()
    sources = {json.loads(s["json"])["source_id"].split("#")[0] for s in read_samples(folder)}
    assert sources and sources <= set(kept)
