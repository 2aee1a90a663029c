"""Aspect-ratio buckets: a target goes to the SDXL bucket nearest its aspect ratio, the time ids carry
its original size, crop and bucket, a batch holds one bucket, and the UNet gets those time ids and
latents of the bucket's shape in a training step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipelines.config import ShardsConfig
from pipelines.shards.contract import sample_key
from pipelines.stages.encode import sample_members
from pipelines.stages.resize import Geometry
from training.cache import main as cache_main
from training.data.datamodule import ShardDataModule
from training.data.sample import SDXL_BUCKETS, DecodeSample, SampleConfig, bucket_sizes, pick_bucket
from training.module import Stage2Module

TINY = dict(resolution=64, clip_size=32, ref_size=64, buckets=True, bucket_multiple=16)


def _members(h: int, w: int, geometry: Geometry | None, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2, w // 4 : w // 2] = True
    box = [float(w // 4), float(h // 4), float(w // 2), float(h // 2)]
    subject = {"label": "x", "bbox": box, "score": 1.0, "area_frac": float(mask.mean()), "mask": mask,
               "ref": image[h // 4 : h // 2, w // 4 : w // 2].copy(), "refmask": mask[h // 4 : h // 2, w // 4 : w // 2].copy(),
               "ref_from": "self"}
    sample = {"image": image, "caption": "x", "subjects": [subject], "source_id": "a", "passthrough": None,
              "geometry": geometry}
    return sample_members(sample, "t", "unpaired", "h", ShardsConfig(image_format="png"))


def _write(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "000000.tar")) as sink:
        for i, (h, w) in enumerate(sizes):
            sink.write({"__key__": sample_key("t", 0, i), **_members(h, w, None, i)})
    (folder / "000000.stats.json").write_text(json.dumps({"samples": len(sizes)}))
    return folder


def test_the_bucket_list_is_sdxls_scaled():
    assert len(SDXL_BUCKETS) == len(set(SDXL_BUCKETS))
    for h, w in SDXL_BUCKETS:  # about 1024^2 pixels, sides of 64, every shape with its transpose
        assert h % 64 == 0 and w % 64 == 0 and 0.9 < h * w / 1024**2 < 1.07 and (w, h) in SDXL_BUCKETS
    assert bucket_sizes(1024, 64) == sorted(SDXL_BUCKETS, key=lambda hw: hw[0] / hw[1])
    tiny = bucket_sizes(64, 16)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in tiny) and (64, 64) in tiny
    # 1:2 -> SDXL's 704 x 1408, and at 64 px 704/16 = 44 -> 48, 1408/16 = 88 -> 96 (sides of 16).
    assert pick_bucket(600, 1200, bucket_sizes(1024, 64)) == (704, 1408)
    assert pick_bucket(32, 64, tiny) == (48, 96) and pick_bucket(64, 32, tiny) == (96, 48)
    assert pick_bucket(128, 128, tiny) == (64, 64)


def test_a_wide_target_gets_its_bucket_and_its_time_ids(tmp_path):
    # A 400x200 (w x h) input, resized by the pipeline to 192x96, then its window of 160x96 at x=16 kept:
    # ratio 0.6 -> the 48 x 80 bucket; the 96 x 160 image is scaled by 1/2 to exactly 48 x 80, no crop.
    members = _members(96, 160, Geometry(400, 200, 192, 96, 16, 0, 160, 96), 0)
    raw = {"__key__": "k", **members}
    out = DecodeSample(SampleConfig(**TINY))(raw, random.Random(0), train=False)
    assert out["pixels"].shape == (3, 48, 80) and out["masks"].shape == (4, 48, 80)
    # original (h, w) = (200, 400); the pipeline's crop at x=16 sits at x=8 of the half-size image.
    assert out["time_ids"].tolist() == [200, 400, 0, 8, 48, 80]
    # The mask follows the image: rows 24..47 and columns 40..79 of 96 x 160, halved (bilinear: soft edges).
    mask = out["masks"][0]
    assert abs(mask.sum().item() - 12 * 20) < 1 and mask[13:23, 21:39].min() == 1
    assert mask[:11].max() == 0 and mask[25:].max() == 0 and mask[:, :19].max() == 0 and mask[:, 41:].max() == 0
    square = DecodeSample(SampleConfig(**{**TINY, "buckets": False}))(raw, random.Random(0), train=False)
    assert square["pixels"].shape == (3, 64, 64) and square["time_ids"].tolist()[4:] == [64, 64]


def test_a_batch_holds_one_bucket_and_the_unet_gets_its_time_ids(tmp_path):
    # Three wide (1:2), three tall (2:1), two square, interleaved.
    sizes = [(32, 64), (64, 32), (64, 64), (32, 64), (64, 32), (64, 64), (32, 64), (64, 32)]
    folder = _write(tmp_path / "shards", sizes)
    data = ShardDataModule(train_shards=[str(folder)], val_shards=[str(folder)], batch_size=3, num_workers=0,
                           batches_per_epoch=2, shuffle_buffer=1, sample=SampleConfig(**TINY, max_subjects=2))
    val = list(data.val_dataloader())
    shapes = sorted((tuple(b["pixels"].shape), tuple(b["masks"].shape[-2:])) for b in val)
    assert shapes == [((2, 3, 64, 64), (64, 64)), ((3, 3, 48, 96), (48, 96)), ((3, 3, 96, 48), (96, 48))]
    for batch in val:  # each row's target size is its batch's
        assert {tuple(t[4:].tolist()) for t in batch["time_ids"]} == {tuple(batch["pixels"].shape[-2:])}
    train = next(iter(data.train_dataloader()))
    assert len({tuple(t[4:].tolist()) for t in train["time_ids"]}) == 1  # one bucket per training batch too

    # The encoder cache keeps each sample's bucket: its latents and masks have the bucket's shape.
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": {"init_args": {"tokenizer_dir": str(tmp_path / "tok")}},
                                  "data": {"sample": {"buckets": True, "bucket_multiple": 16}}}))
    assert cache_main(["--config", str(config), "--shards", str(folder), "--out", str(tmp_path / "enc"),
                       "--runner", "local", "--variants", "1"]) == 0
    data = ShardDataModule(train_shards=[str(folder)], cache_dir=str(tmp_path / "enc"), batch_size=3, num_workers=0,
                           batches_per_epoch=3, shuffle_buffer=1, sample=SampleConfig(**TINY, max_subjects=2))
    for cached in data.train_dataloader():
        (size,) = {tuple(t[4:].tolist()) for t in cached["time_ids"]}
        assert cached["masks"].shape[-2:] == size and cached["latent_params"].shape[-2:] == (size[0] // 4, size[1] // 4)

    module = Stage2Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"))
    module.configure_model()
    seen = {}
    module.model.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(shape=args[0].shape, time_ids=kwargs["added_cond_kwargs"]["time_ids"]),
        with_kwargs=True)
    wide = next(b for b in val if b["pixels"].shape[-1] == 96)
    loss = module.training_step(module.on_before_batch_transfer(wide, 0), 0)
    assert torch.isfinite(loss)
    assert seen["shape"] == (3, 4, 12, 24)  # the tiny VAE's factor 4 on 48 x 96
    # Inputs of 32 x 64 scaled by 1.5 to 48 x 96: nothing cropped; the json's original size is the input's.
    assert seen["time_ids"].tolist() == [[32, 64, 0, 0, 48, 96]] * 3
