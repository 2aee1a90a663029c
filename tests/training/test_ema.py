"""EMA of the trained parts in real (tiny) Trainer runs: the decay formula over two steps, saved in
the checkpoint, resumed, and exported with `training.export --ema`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.ema import EMA
from training.export import main as export_main
from training.module import Stage1Module

pytestmark = pytest.mark.slow
DECAY = 0.5


class Record(L.Callback):
    """The raw trainable weights at the fit's start and after each step, and the EMA it resumed with."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.steps, self.resumed = ema, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.resumed = {k: v.clone() for k, v in self.ema.ema.items()}
        self.steps.append({k: p.detach().double().clone() for k, p in pl_module.trainable.items()})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append({k: p.detach().double().clone() for k, p in pl_module.trainable.items()})


def _fit(shard_dirs, root: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[Record, Path]:
    module = Stage1Module(preset="tiny", tokenizer_dir=str(root / "tok"), lr=1e-2, val_timesteps=[500])
    data = ShardDataModule(
        train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])], batch_size=2, num_workers=0,
        batches_per_epoch=4, shuffle_buffer=1, sample=SampleConfig(resolution=64, clip_size=32, ref_size=64),
    )
    ema = EMA(decay=DECAY)
    record = Record(ema)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, limit_val_batches=0,
                        callbacks=[ema, record], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    path = root / f"step{max_steps}.ckpt"
    trainer.save_checkpoint(path)
    # As LightningCLI writes it: the class path in the hyper-parameters (training.export reads it), the
    # data module's as plain values (here a SampleConfig object, which weights_only loading refuses).
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "training.module.Stage1Module"
    checkpoint.pop("datamodule_hyper_parameters")
    torch.save(checkpoint, path)
    return record, path


def test_ema_follows_the_decay_resumes_and_exports(shard_dirs, tmp_path):
    record, ckpt = _fit(shard_dirs, tmp_path, max_steps=2)
    start, step1, step2 = record.steps
    expected = {k: DECAY * (DECAY * start[k] + (1 - DECAY) * step1[k]) + (1 - DECAY) * step2[k] for k in start}
    saved = torch.load(ckpt, weights_only=True)["ema_state_dict"]
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=1e-6)
    moved = [k for k in saved if not torch.allclose(saved[k].double(), step2[k], atol=1e-6)]
    assert len(moved) > len(saved) // 2  # the EMA is not the raw weights

    # Resume: the EMA continues from the saved one, not from the resumed raw weights.
    resumed, _ = _fit(shard_dirs, tmp_path / "resume", max_steps=3, ckpt_path=str(ckpt))
    assert all(torch.equal(resumed.resumed[k], saved[k]) for k in saved)
    _, step3 = resumed.steps
    after = torch.load(tmp_path / "resume" / "step3.ckpt", weights_only=True)["ema_state_dict"]
    for key, value in after.items():
        torch.testing.assert_close(value.double(), DECAY * saved[key].double() + (1 - DECAY) * step3[key],
                                   rtol=0, atol=1e-6)

    # --ema: the trained parts are the EMA, every other adapter tensor is the checkpoint's raw one.
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "raw")]) == 0
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    raw, ema = load_file(str(tmp_path / "raw" / "anystory.safetensors")), load_file(str(tmp_path / "ema" / "anystory.safetensors"))
    assert raw.keys() == ema.keys() and set(saved) < set(raw)
    assert all(torch.equal(ema[k], saved[k]) for k in saved)
    assert all(torch.equal(ema[k], raw[k]) for k in raw if k not in saved)
    assert all(torch.equal(raw[k].double(), step2[k]) for k in saved)


def test_export_ema_without_ema_weights_names_the_callback(tmp_path, capsys):
    module = Stage1Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"))
    module.configure_model()
    checkpoint = {"hyper_parameters": {**dict(module.hparams), "_class_path": "training.module.Stage1Module"},
                  "state_dict": module.state_dict(), "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "a.ckpt")
    assert export_main(["--ckpt", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "training.ema.EMA" in err and not (tmp_path / "out").exists()
