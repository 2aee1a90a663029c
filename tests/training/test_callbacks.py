"""SampleImages in a real (tiny) Trainer run with W&B offline: what reaches the run directory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import wandb
import webdataset as wds
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from wandb.proto import wandb_internal_pb2

from training.callbacks import SampleImages
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.module import Stage2Module

pytestmark = pytest.mark.slow

BLOCK = 32768  # the W&B transaction log is a LevelDB-style log: 32 KiB blocks of framed records
FRAME = 7  # crc32 (4) + length (2) + type (1)


def history(run_file: Path) -> list[dict]:
    """The history rows of an offline run, read from its .wandb transaction log."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + FRAME <= len(data):
        if BLOCK - pos % BLOCK < FRAME:  # a block's tail too short for a frame is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + FRAME])
        pending += data[pos + FRAME:pos + FRAME + length]
        pos += FRAME + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(_row(record.history.item))
    return rows


def _row(items) -> dict:
    """A history row; a logged dict (an image list) arrives as one item per nested key."""
    row: dict = {}
    for item in items:
        *parents, last = item.nested_key or [item.key]
        target = row
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = json.loads(item.value_json)
    return row


def test_sample_images_reach_the_offline_run_at_their_global_step(shard_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    max_subjects, resolution = 4, 64
    module = Stage2Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"), val_timesteps=[500])
    data = ShardDataModule(
        train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])], batch_size=2, num_workers=0,
        batches_per_epoch=2, shuffle_buffer=1,
        sample=SampleConfig(resolution=resolution, clip_size=32, ref_size=64, max_subjects=max_subjects),
    )
    logger = WandbLogger(project="anystory-test", offline=True, save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=logger, limit_val_batches=0,
                        callbacks=[SampleImages(every_n_steps=2, num_samples=2, num_inference_steps=2)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    wandb.finish()

    # What the callback was given: the first two validation samples, read here from the shard itself.
    val = list(wds.WebDataset(str(shard_dirs["val"] / "000000.tar"), shardshuffle=False))[:2]
    captions = [json.loads(s["json"])["caption"] for s in val]

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = history(next(run_dir.glob("run-*.wandb")))
    for key in ("samples/images", "samples/routing_maps"):
        logged = [row for row in rows if key in row]
        # Every 2 steps of a 2-step run: at global step 2, not 1.
        assert [row["trainer/global_step"] for row in logged] == [2], key
        entry = logged[0][key]
        assert entry["count"] == 2 and entry["captions"] == captions
        pictures = [Image.open(run_dir / "files" / name) for name in entry["filenames"]]
        if key == "samples/images":
            # The image with its reference slots beside it: (max_subjects + 1) squares in a row;
            # the sample's subjects fill the first slots, the empty slots stay white.
            for picture, sample in zip(pictures, val, strict=True):
                assert picture.size == ((max_subjects + 1) * resolution, resolution)
                squares = [picture.crop((k * resolution, 0, (k + 1) * resolution, resolution)) for k in
                           range(max_subjects)]
                filled = [bool(np.any(np.asarray(sq) != 255)) for sq in squares]
                subjects = min(json.loads(sample["json"])["num_subjects"], max_subjects)
                assert filled == [k < subjects for k in range(max_subjects)]
        else:
            assert all(p.width > 12 * 96 and p.height > 2 * 96 for p in pictures)  # 11 layers + image; rows
