"""`dvc repro` from nothing in a scratch copy of the repo: toy sources, then both shard stages."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.pipelines.helpers import read_samples, read_stats, toy_params, write_params
from tests.pipelines.processes import BIN, REPO, child_env

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_dvc_repro_builds_resumes_and_pushes(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(REPO / "pipelines", work / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = toy_params("data/toyworld", "data/shards")
    params["train"] = yaml.safe_load((REPO / "params.yaml").read_text())["train"]  # dvc.yaml interpolates it
    write_params(work / "params.yaml", params)
    env = child_env() | {"PYTHONPATH": str(work)}  # the copy's code, not the checkout's
    dvc = str(BIN / "dvc")
    run(["git", "init", "-q"], work, env)
    run([dvc, "init", "-q"], work, env)
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")

    # dvc.yaml goes on with the training chain; this test builds the data stages only.
    targets = ["shards_unpaired", "shards_paired"]
    first = run([dvc, "repro", *targets], work, env)
    assert "data build summary" in first.stdout
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"toyworld", "shards_unpaired", "shards_paired"}
    for kind in ("unpaired", "paired"):
        stats = read_stats(work / "data" / "shards" / kind)
        assert stats and sum(s["samples"] for s in stats.values()) == len(read_samples(work / "data" / "shards" / kind))
    assert "up to date" in run([dvc, "status", *targets], work, env).stdout

    second = run([dvc, "repro", *targets], work, env)
    assert "data build summary" not in second.stdout  # nothing changed: no stage ran

    # A changed pairing threshold reruns only the paired stage; persist kept the old shards in place,
    # and the build redid them because their params hash no longer matches.
    paired = work / "data" / "shards" / "paired"
    old_hashes = {s["params_hash"] for s in read_stats(paired).values()}
    unpaired_mtimes = {p.name: p.stat().st_mtime_ns for p in (work / "data" / "shards" / "unpaired").iterdir()}
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["video"]["min_gap_s"] = 1.0
    write_params(work / "params.yaml", params)
    status = run([dvc, "status", *targets], work, env).stdout
    assert "shards_paired" in status and "shards_unpaired" not in status and "toyworld:" not in status
    third = run([dvc, "repro", *targets], work, env)
    assert "0 already done" in third.stdout and "[unpaired]" not in third.stdout
    new_hashes = {s["params_hash"] for s in read_stats(paired).values()}
    assert len(new_hashes) == 1 and new_hashes != old_hashes
    assert all(json.loads(s["json"])["time_gap_s"] >= 1.0 for s in read_samples(paired))
    assert {p.name: p.stat().st_mtime_ns for p in (work / "data" / "shards" / "unpaired").iterdir()} == unpaired_mtimes

    run([dvc, "remote", "add", "-d", "store", str(tmp_path / "remote")], work, env)
    run([dvc, "push", *targets], work, env)
    assert any((tmp_path / "remote").rglob("*")), "nothing pushed"
