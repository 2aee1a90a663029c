"""Stage 1 under FSDP: two processes on the CPU (gloo) launched with torchrun, with the strategy of
training/configs/sdxl_stage1_fsdp.yaml on the tiny preset. The trained parts are sharded (each rank
holds about half of them), the frozen UNet is whole on both; the gradient norm is clipped over all
shards; the checkpoint holds AnyStory's tensors only, exports, and a `--ckpt_path last` run resumes
the weights and the sharded optimizer state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from tests.training.cli import CONFIGS, env, fit_args, torchrun
from training.export import main as export_main
from training.fsdp import FSDPConfigError, prepare_fsdp
from training.module import Stage1Module

pytestmark = pytest.mark.slow
CLIP = 1e-3


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, unchanged: the trainer refuses the class itself on a CPU accelerator
    (an exact type check), though FSDP runs there with gloo."""


def _global_norm(params) -> float:
    """The norm of all ranks' gradient shards together (each element lives on one rank)."""
    local = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            local += p.grad.double().pow(2).sum()
    dist.all_reduce(local)
    return float(local.sqrt())


class ShardRecord(L.Callback):
    """Per rank: how much of the trained and frozen tensors this rank holds, and the gradient norm over
    all shards before and after clipping; written to `<out>/rank<r>.json` at the end of the fit."""

    def __init__(self, out: str) -> None:
        self.out, self.record = Path(out), {"norms": []}

    def on_train_start(self, trainer, pl_module) -> None:
        trained = [k for k, p in pl_module.trainable.items() if p.requires_grad]
        self.record.update(
            trained_local=sum(pl_module.trainable[k].numel() for k in trained),
            trained_full=sum(pl_module.adapter_meta[k].numel() for k in trained),
            unet_local=sum(p.numel() for n, p in pl_module.model.unet.named_parameters() if ".processor." not in n),
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # before clipping
        self.before = _global_norm(p for group in optimizer.param_groups for p in group["params"])

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # the clipped gradients the step used
        params = [p for p in pl_module.trainable.values() if p.requires_grad]
        self.record["norms"].append([self.before, _global_norm(params)])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def test_fsdp_stage1_on_two_cpu_processes(shard_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the run's hyper-parameters (the tokenizer cache), as in the run
    shipped = yaml.safe_load((CONFIGS / "sdxl_stage1_fsdp.yaml").read_text())["trainer"]["strategy"]
    assert shipped["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    shipped = {"class_path": "tests.training.test_fsdp.CPUFSDPStrategy",
               "init_args": {**shipped["init_args"], "process_group_backend": "gloo"}}
    ckpt_dir = tmp_path / "ckpt"
    config = {"trainer": {
        "devices": 2, "gradient_clip_val": CLIP, "limit_val_batches": 0, "strategy": shipped,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_last": True}},
            {"class_path": "tests.training.test_fsdp.ShardRecord", "init_args": {"out": str(tmp_path / "record")}},
        ]}}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    extra = ["-c", str(tmp_path / "fsdp.yaml"), "--data.num_workers=0", "--model.init_args.lr=1e-2",
             "--model.init_args.gradient_checkpointing=true"]
    log = torchrun(fit_args(shard_dirs, stage=1, max_steps=2, extra=extra), tmp_path, port=29537)
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log

    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    full = ranks[0]["trained_full"]
    assert ranks[1]["trained_full"] == full > 0
    for rank in ranks:  # sharded: about half each (FSDP pads each unit to an even split)
        assert 0.4 * full < rank["trained_local"] < 0.6 * full
    assert ranks[0]["trained_local"] + ranks[1]["trained_local"] == full
    assert ranks[0]["unet_local"] == ranks[1]["unet_local"] > 0  # the frozen UNet: whole on both ranks
    assert ranks[0]["norms"] == ranks[1]["norms"] and len(ranks[0]["norms"]) == 2
    for before, after in ranks[0]["norms"]:
        assert before > 10 * CLIP and after == pytest.approx(CLIP, rel=1e-3)

    # The checkpoint: AnyStory's tensors only, whole; the trained ones moved, the others as built.
    checkpoint = torch.load(str(ckpt_dir / "last.ckpt"), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    fresh = Stage1Module(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    fresh.configure_model()
    initial = fresh.model.adapter_state_dict()
    state = checkpoint["state_dict"]
    assert list(state) == [f"model.{k}" for k in initial]
    assert all(state[f"model.{k}"].shape == v.shape for k, v in initial.items())
    trained = set(fresh.trainable)
    assert all(not torch.equal(state[f"model.{k}"], initial[k]) for k in trained)
    assert all(torch.equal(state[f"model.{k}"], v) for k, v in initial.items() if k not in trained)

    assert export_main(["--ckpt", str(ckpt_dir / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "anystory.safetensors"))
    assert exported.keys() == initial.keys() and all(torch.equal(exported[k], state[f"model.{k}"]) for k in exported)

    # Resume from last: the step and the sharded Adam state continue (a fresh optimizer would count 1).
    torchrun(fit_args(shard_dirs, stage=1, max_steps=3, extra=[*extra, "--ckpt_path=last"]), tmp_path, port=29537)
    resumed = torch.load(str(ckpt_dir / "last.ckpt"), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 3
    steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert steps == {3.0}
    assert any(not torch.equal(resumed["state_dict"][k], v) for k, v in state.items())


def test_unsupported_fsdp_settings_are_one_line_naming_the_key():
    for stage, kwargs, key in ((2, {}, "trainer.strategy:"),
                               (1, {"state_dict_type": "sharded"}, "trainer.strategy.init_args.state_dict_type"),
                               (1, {"sharding_strategy": "NO_SHARD"}, "trainer.strategy.init_args.sharding_strategy")):
        with pytest.raises(FSDPConfigError) as err:
            prepare_fsdp(FSDPStrategy(**kwargs), stage)
        assert "\n" not in str(err.value) and str(err.value).startswith(key)
    strategy = FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")
    prepare_fsdp(strategy, 1)
    assert strategy.kwargs["use_orig_params"] is True  # what Lightning's optimizer setup reads


def test_fsdp_for_stage2_from_the_cli_is_one_line(shard_dirs, tmp_path):
    """The CLI user's view of the refusal: exit 2, one line naming the key, no traceback."""
    strategy = "{class_path: tests.training.test_fsdp.CPUFSDPStrategy}"
    args = fit_args(shard_dirs, stage=2, max_steps=1, extra=[f"--trainer.strategy={strategy}", "--trainer.logger=false",
                                                          "--trainer.callbacks=[]"])
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m training: error: trainer.strategy: FSDPStrategy")
    assert "Traceback" not in proc.stderr
