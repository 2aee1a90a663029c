"""End to end with real Ray: `ray job submit` against a head, and a SIGKILLed build that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipelines.build import run_build
from pipelines.config import ToyworldConfig, parse_data_config
from pipelines.toyworld.generate import generate
from tests.pipelines.helpers import read_samples, read_stats, toy_params, write_params
from tests.pipelines.processes import BIN, REPO, child_env, kill_tree, ray_head

pytestmark = pytest.mark.slow


def shard_digest(folder) -> dict:
    """What must be identical between two builds: keys and member hashes, shard by shard."""
    return {n: (st["samples"], st["member_sha256"]) for n, st in read_stats(folder).items()}


def test_ray_job_submit_builds_the_shards(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "unused")
    pfile = write_params(tmp_path / "params.yaml", params)
    out_url = f"file://{tmp_path}/shared/shards"
    with ray_head() as address:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "pipelines/build_shards.py", "--params", pfile, "--out", out_url],
            env=child_env(), capture_output=True, text=True, timeout=400)
        jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=child_env(),
                              capture_output=True, text=True).stdout
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log and "status=<JobStatus.SUCCEEDED" in jobs.replace("'", "")
    assert "data build summary" in log
    # the same shards as the same stages give in one process, without Ray
    cfg = parse_data_config(params["data"])
    for kind in ("unpaired", "paired"):
        ref = run_build(cfg, kind, str(tmp_path / "reference"), runner="local")
        got = tmp_path / "shared" / "shards" / kind
        assert shard_digest(got) == shard_digest(tmp_path / "reference" / kind)
        assert len(read_stats(got)) == ref.planned and len(read_samples(got)) == ref.totals()["samples"] > 0


def build_cmd(pfile: str) -> list[str]:
    return [sys.executable, "pipelines/build_shards.py", "--params", pfile, "--kind", "unpaired"]


def test_sigkilled_build_resumes_to_the_same_shards(tmp_path):
    toy = tmp_path / "toy"
    generate(ToyworldConfig(out_dir=str(toy), num_images=240, image_size=160, num_videos=1, seed=5))
    params = toy_params(toy, tmp_path / "out", shards__images_per_shard=8)
    params["data"]["toyworld"].update(num_images=240, image_size=160, num_videos=1, seed=5)
    pfile = write_params(tmp_path / "params.yaml", params)
    folder = tmp_path / "out" / "unpaired"
    planned = 30

    proc = subprocess.Popen(build_cmd(pfile), cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (folder.exists() and any(n.endswith(".stats.json") for n in os.listdir(folder))):
            assert proc.poll() is None and time.time() < deadline, "build ended or hung before any shard"
            time.sleep(0.01)
    finally:
        kill_tree(proc)  # SIGKILL: the driver, its local Ray cluster and workers, mid-build
    done_at_kill = len(read_stats(folder))
    assert 0 < done_at_kill < planned

    resumed = subprocess.run(build_cmd(pfile), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{planned} planned, {done_at_kill} already done" in resumed.stdout

    reference = run_build(parse_data_config(params["data"]), "unpaired", str(tmp_path / "ref"), runner="local")
    assert reference.planned == planned
    assert shard_digest(folder) == shard_digest(tmp_path / "ref" / "unpaired")
    names = sorted(os.listdir(folder))
    assert names == sorted(f"{n:06d}.{ext}" for n in range(planned) for ext in ("tar", "status.parquet", "stats.json"))
    keys = [s["__key__"] for s in read_samples(folder)]
    assert len(keys) == len(set(keys)) == reference.totals()["samples"]
    for n in range(planned):  # the tars themselves are byte-identical too
        assert (folder / f"{n:06d}.tar").read_bytes() == (tmp_path / "ref" / "unpaired" / f"{n:06d}.tar").read_bytes()

    mtimes = {n: os.stat(folder / n).st_mtime_ns for n in names}
    again = subprocess.run(build_cmd(pfile), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0 and f"{planned} already done, 0 written this run" in again.stdout
    assert {n: os.stat(folder / n).st_mtime_ns for n in sorted(os.listdir(folder))} == mtimes
    assert json.loads((folder / "000000.stats.json").read_text())["inputs"] == 8
