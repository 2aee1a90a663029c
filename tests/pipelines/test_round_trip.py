"""The packages joined: the pipeline's real build (local runner) on a small toyworld -> training's
ShardDataModule -> one Stage1Module step on the tiny preset. The batch the step receives is the
build's samples (keys, captions, original sizes from the sample json), and the step trains."""

from __future__ import annotations

import json
import math

import lightning as L
import torch

from pipelines.build import run_build
from pipelines.config import parse_data_config
from tests.pipelines.helpers import read_samples, toy_params
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.module import Stage1Module


class Record(L.Callback):
    """The batch the training step receives, and the trainable weights before and after the step."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: p.detach().clone() for k, p in pl_module.trainable.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after = {k: p.detach().clone() for k, p in pl_module.trainable.items()}


def test_built_shards_feed_one_stage1_training_step(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "out")
    result = run_build(parse_data_config(params["data"]), "unpaired", params["data"]["out_dir"], runner="local")
    folder = tmp_path / "out" / "unpaired"
    built = {s["__key__"]: json.loads(s["json"]) for s in read_samples(folder)}
    assert len(built) == result.totals()["samples"] > 0

    sample = SampleConfig(resolution=64, clip_size=32, ref_size=64, max_subjects=1, caption_drop=0.0, clip_drop=0.0)
    data = ShardDataModule(train_shards=[str(folder)], batch_size=2, num_workers=0, batches_per_epoch=1,
                           shuffle_buffer=1, sample=sample)
    module = Stage1Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"), lr=1e-3)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, limit_val_batches=0,
                        callbacks=[record], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)

    (batch,) = record.batches
    assert len(batch["key"]) == 2 and set(batch["key"]) <= set(built)
    for i, key in enumerate(batch["key"]):
        meta = built[key]
        assert batch["caption"][i] == meta["caption"] != ""
        original = [meta.get("original_height", meta["height"]), meta.get("original_width", meta["width"])]
        assert batch["time_ids"][i, :2].tolist() == original
        assert bool(batch["valid"][i, 0]) and float(batch["masks"][i, 0].sum()) > 0  # its first subject's mask
    assert batch["pixels"].shape == (2, 3, 64, 64) and batch["ref_pixels"].shape[:2] == (2, 1)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    moved = [k for k in record.before if not torch.equal(record.before[k], record.after[k])]
    assert len(moved) > len(record.before) // 2  # one optimizer step changed the trained parts
