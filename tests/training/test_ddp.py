"""A 2-process DDP run on the CPU (gloo), launched with torchrun the way clusters launch it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.training.cli import env, fit_args

pytestmark = pytest.mark.slow


def test_torchrun_two_processes(shard_dirs, tmp_path):
    args = fit_args(shard_dirs, stage=1, max_steps=2,
                    extra=["--trainer.devices=2", "--trainer.strategy=ddp", "--data.num_workers=0"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-port=29531", "-m", "training", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both ranks joined one process group
    ckpt = torch.load(str(tmp_path / "runs" / "tiny_stage1" / "checkpoints" / "last.ckpt"),
                      map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
