"""Ray Train launch: two CPU workers with Ray's DDP strategy on a local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.training.cli import env, fit_args

pytestmark = pytest.mark.slow


def test_ray_train_two_workers(shard_dirs, tmp_path):
    args = fit_args(shard_dirs, stage=1, max_steps=2, extra=["--data.num_workers=0"])[1:]  # no "fit" subcommand
    cmd = [sys.executable, "-m", "training.ray_train", "--workers", "2", "--cpus-per-worker", "0.5",
           "--num-cpus", "2", "--", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env() | {"RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-6000:]
    assert "world_size=2" in log and "[rank: 1]" in log  # two processes in one group
    ckpt = torch.load(str(tmp_path / "runs" / "tiny_stage1" / "checkpoints" / "last.ckpt"), map_location="cpu",
                      weights_only=True)
    assert ckpt["global_step"] == 2
