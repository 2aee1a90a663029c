"""The encoder cache: a cached batch trains exactly as the batch it was encoded from, without running
the encoders; the cache stage (real Ray) writes complete shards atomically and skips current ones;
a missing, stale or mismatched cache stops the run with one line naming its path."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml

from training.cache import main as cache_main
from training.data.cached import (
    MANIFEST,
    DecodeCached,
    EncoderCacheError,
    cache_shard_path,
    read_null,
    variant_rng,
)
from training.data.datamodule import ShardDataModule, list_shards
from training.data.sample import DecodeSample, SampleConfig, collate
from training.module import Stage2Module

SIZES = dict(resolution=64, clip_size=32, ref_size=64)


def _config(tmp: Path) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": {"preset": "tiny", "tokenizer_dir": str(tmp / "tok")}},
                                    "data": {"sample": dict(SIZES)}}))
    return path


def _cache(shards: Path, out: Path, config: Path, *extra: str) -> int:
    return cache_main(["--config", str(config), "--shards", str(shards), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def cache(shard_dirs, tmp_path_factory) -> dict[str, Path]:
    """The cache stage as DVC runs it: a Ray job (a private local instance, one encoder actor)."""
    tmp = tmp_path_factory.mktemp("cache")
    config = _config(tmp)
    assert _cache(shard_dirs["train"], tmp / "enc", config, "--variants", "2") == 0
    return {"dir": tmp / "enc", "config": config, "tmp": tmp}


def _rows(tar: str) -> dict[str, dict]:
    return {raw["__key__"]: raw for raw in wds.tarfile_samples([{"url": tar}])}


def test_cached_batch_gives_the_encoded_batchs_loss_without_the_encoders(shard_dirs, cache):
    # Per-load choices off, so that the cached row and the decoded row are the same draw.
    sample = SampleConfig(**SIZES, max_subjects=4, shuffle_subjects=False, caption_drop=0.0, clip_drop=0.0)
    shard = list_shards([str(shard_dirs["train"])])[0]
    raw, cached = _rows(shard), _rows(cache_shard_path(str(cache["dir"]), shard))
    keys = sorted(cached)[:3]  # 2, 3 and 1 subjects of 4 slots: padding is in the batch
    decode_cached = DecodeCached(sample, read_null(str(cache["dir"])))
    # Seeds whose first draw (DecodeCached's choice of variant) is variant 0, 1, 0.
    variants = dict(zip(keys, (0, 1, 0), strict=True))
    seeds = {k: next(s for s in range(100) if random.Random(s).randrange(2) == variants[k]) for k in keys}
    picks = {k: random.Random(seeds[k]) for k in keys}
    from_cache = collate([decode_cached(cached[k], picks[k]) for k in keys])
    encoded = collate([DecodeSample(replace(sample, max_subjects=4))(raw[k], variant_rng(0, k, variants[k]))
                       for k in keys])
    assert from_cache["valid"].sum(1).tolist() == encoded["valid"].sum(1).tolist() == [2, 3, 1]
    assert torch.equal(from_cache["masks"], encoded["masks"]) and torch.equal(from_cache["time_ids"], encoded["time_ids"])

    module = Stage2Module(preset="tiny", tokenizer_dir=str(cache["tmp"] / "tok"))
    module.configure_model()
    module.train()
    calls = []
    for encoder in (module.vae.encoder, module.text_encoder, module.text_encoder_2, module.model.image_encoder):
        encoder.register_forward_hook(lambda *_: calls.append(1))
    losses = {}
    for name, batch in (("encoded", encoded), ("cached", from_cache)):
        batch["all_valid"] = bool(batch["valid"].all())
        calls.clear()
        torch.manual_seed(0)  # the same posterior draw, noise, timesteps and Gumbel draws
        with pytest.warns(UserWarning):  # self.log outside a Trainer
            losses[name] = float(module.training_step(batch, 0))
        assert (len(calls) > 0) == (name == "encoded")  # the cached step runs none of the four encoders
    assert losses["cached"] == pytest.approx(losses["encoded"], rel=1e-5, abs=1e-7)
    # Another draw of the posterior gives another loss: the step samples from the cached posterior.
    torch.manual_seed(1)
    with pytest.warns(UserWarning):
        assert float(module.training_step(from_cache, 0)) != pytest.approx(losses["cached"], rel=1e-4)


def test_cache_stage_writes_complete_shards_atomically_and_skips_current_ones(shard_dirs, cache, capsys):
    out = cache["dir"]
    for shard in list_shards([str(shard_dirs["train"])]):
        stats = json.loads(Path(cache_shard_path(str(out), shard)[:-4] + ".stats.json").read_text())
        # The fixture: 6 samples per shard, the first with an undecodable target.
        assert stats["samples"] == 5 and stats["rejected"] == {"undecodable png": 1}
        assert len(_rows(cache_shard_path(str(out), shard))) == 5
    assert [p.name for p in out.rglob("*") if p.name.endswith(".tmp")] == []  # temporary names, all renamed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _cache(shard_dirs["train"], out, cache["config"], "--variants", "2", "--runner", "local") == 0
    assert "0 of 2 shards to write" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != MANIFEST} == {p: t for p, t in before.items() if p.name != MANIFEST}


def _module(shards: Path, cache_dir: Path, batch_size: int = 2, batches_per_epoch: int = 1, **sample) -> ShardDataModule:
    return ShardDataModule(train_shards=[str(shards)], cache_dir=str(cache_dir), batch_size=batch_size, num_workers=0,
                           batches_per_epoch=batches_per_epoch, shuffle_buffer=1, sample=SampleConfig(**{**SIZES, **sample}))


def test_the_data_module_reads_the_cache(shard_dirs, cache):
    batch = next(iter(_module(shard_dirs["train"], cache["dir"], max_subjects=2).train_dataloader()))
    assert "pixels" not in batch and batch["latent_params"].shape == (2, 8, 16, 16)  # tiny VAE: 4 channels, /4
    assert batch["clip_tokens"].shape[:2] == (2, 2) and batch["masks"].shape == (2, 2, 64, 64)


def test_bad_caches_are_one_line_naming_the_path(shard_dirs, cache, tmp_path):
    def error(module: ShardDataModule) -> str:
        with pytest.raises(EncoderCacheError) as err:
            module.train_dataloader()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert str(tmp_path / "none" / MANIFEST) in error(_module(shard_dirs["train"], tmp_path / "none"))
    assert "data.sample.resolution=32" in error(_module(shard_dirs["train"], cache["dir"], resolution=32))
    assert "max_subjects" in error(_module(shard_dirs["train"], cache["dir"], max_subjects=5))
    # A cache made from other shards: the shards of this folder have no cache shards.
    other = tmp_path / "other" / shard_dirs["train"].name
    other.mkdir(parents=True)
    for name in ("000000.tar", "000000.stats.json"):
        (other / name).write_bytes((shard_dirs["train"] / name).read_bytes())
    (other / "000000.stats.json").write_text('{"samples": 6, "rebuilt": true}')  # a rebuilt shard
    assert "stale" in error(_module(other, cache["dir"]))
    # The cache's stats file names the cache shard in the message.
    assert cache_shard_path(str(cache["dir"]), str(other / "000000.tar")) in error(_module(other, cache["dir"]))


def test_the_cache_cli_is_one_line_on_user_errors(shard_dirs, tmp_path, capsys):
    config = _config(tmp_path)
    assert _cache(tmp_path / "nothing", tmp_path / "enc", config, "--runner", "local") == 2
    assert _cache(shard_dirs["train"], tmp_path / "enc", config, "--base-dir", str(tmp_path / "nobase")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and str(tmp_path / "nothing") in err[0] and str(tmp_path / "nobase") in err[1]
    assert not (tmp_path / "enc").exists()  # nothing written before the inputs were checked


def test_a_damaged_sample_shard_is_cached_up_to_the_damage(shard_dirs, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    data = (shard_dirs["train"] / "000000.tar").read_bytes()
    members = _rows(str(shard_dirs["train"] / "000000.tar"))
    (folder / "000000.tar").write_bytes(data[: len(data) * 2 // 3])  # cut inside the last samples
    (folder / "000000.stats.json").write_text('{"samples": 6}')
    assert _cache(folder, tmp_path / "enc", _config(tmp_path), "--runner", "local", "--variants", "1") == 0
    cached = _rows(cache_shard_path(str(tmp_path / "enc"), str(folder / "000000.tar")))
    stats = json.loads((tmp_path / "enc" / "train" / "000000.stats.json").read_text())
    # What the cut tar still holds whole, less the undecodable first sample, is cached and counted.
    assert 0 < stats["samples"] == len(cached) < 5 and set(cached) < set(members)
    assert stats["rejected"]["undecodable png"] == 1 and any(k.startswith("tar: ") for k in stats["rejected"])


def test_a_cached_run_selects_single_subject_images_like_an_uncached_one(shard_dirs, cache):
    cached = _module(shard_dirs["train"], cache["dir"], batch_size=1, batches_per_epoch=12, max_subjects=1,
                     max_image_subjects=1)
    keys = {k for b in cached.train_dataloader() for k in b["key"]}
    sample = SampleConfig(**SIZES, max_subjects=1, max_image_subjects=1)
    plain = ShardDataModule(train_shards=[str(shard_dirs["train"])], batch_size=1, num_workers=0,
                            batches_per_epoch=12, shuffle_buffer=1, sample=sample)
    expected = {k for b in plain.train_dataloader() for k in b["key"]}
    assert keys == expected and len(expected) == 2  # 2 shards x 6 samples: 1 subject in 4, one of them corrupt each
