"""A 2-process DDP run on the CPU (gloo), launched with torchrun the way clusters launch it."""

from __future__ import annotations

import pytest
import torch

from tests.training.cli import fit_args, torchrun

pytestmark = pytest.mark.slow


def test_torchrun_two_processes(shard_dirs, tmp_path):
    strategy = tmp_path / "ddp.yaml"  # buffers are constant: no broadcast, and no hang on uneven validation
    strategy.write_text("trainer:\n  devices: 2\n  strategy:\n"
                        "    class_path: lightning.pytorch.strategies.DDPStrategy\n"
                        "    init_args: {forward_sync_buffers: false, process_group_backend: gloo}\n")
    # Stage 2: every router parameter must get a gradient, or DDP fails at its second step.
    args = fit_args(shard_dirs, stage=2, max_steps=3,
                    extra=["-c", str(strategy), "--data.num_workers=0", "--model.init_args.init_from=null"])
    log = torchrun(args, tmp_path, port=29531)
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both ranks joined one process group
    ckpt = torch.load(str(tmp_path / "runs" / "tiny_stage2" / "checkpoints" / "last.ckpt"),
                      map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
