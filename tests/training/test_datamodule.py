from __future__ import annotations

import json
import random
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.training.shards import write_shards
from training.data.augment import AugmentConfig, augment_reference
from training.data.datamodule import (
    DecodeAndBatch,
    RejectCounter,
    ShardDataModule,
    UnreadableShards,
    list_shards,
)
from training.data.sample import DecodeSample, SampleConfig

SAMPLE = SampleConfig(resolution=32, clip_size=16, ref_size=32, max_subjects=2)


def _raw(folder):
    return list(wds.WebDataset(str(folder / "000000.tar"), shardshuffle=False))


def test_incomplete_shards_are_not_listed(shard_dirs, tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"partial")  # no stats file: not done
    assert list_shards([str(shard_dirs["val"])]) == [str(shard_dirs["val"] / "000000.tar")]
    try:
        list_shards([str(tmp_path)])
    except FileNotFoundError as err:
        assert "no complete shards" in str(err)
    else:
        raise AssertionError("a folder with only a partial tar must be an error")


def test_decoded_sample_follows_the_contract(shard_dirs):
    raw = _raw(shard_dirs["val"])[2]  # three subjects in the file, capped at two
    out = DecodeSample(SAMPLE)(raw, random.Random(0), train=False)
    assert out["pixels"].shape == (3, 32, 32) and -1 <= out["pixels"].min() and out["pixels"].max() <= 1
    assert out["masks"].shape == (2, 32, 32) and out["valid"].tolist() == [True, True]
    assert out["clip_pixels"].shape == (2, 3, 16, 16) and out["ref_pixels"].shape == (2, 3, 32, 32)
    assert out["time_ids"].tolist() == [64, 64, 0, 0, 32, 32]
    assert not out["drop"] and out["caption"] == "things on noise"
    # Background removal: the ReferenceNet input is 0 wherever the reference mask is 0.
    outside = out["ref_masks"][:, 0] == 0
    assert outside.any() and not out["ref_pixels"].permute(1, 0, 2, 3)[:, outside].any()
    # Each mask sits where its colour is in the target.
    for slot in range(2):
        inside = out["masks"][slot] > 0.5
        colour = out["pixels"][:, inside].mean(1)
        assert colour.std() > 0.3  # one saturated colour, not grey noise


def test_padding_when_fewer_subjects_than_slots(shard_dirs):
    raw = _raw(shard_dirs["val"])[0]  # one subject
    out = DecodeSample(SAMPLE)(raw, random.Random(0), train=False)
    assert out["valid"].tolist() == [True, False]
    assert not out["masks"][1].any() and not out["clip_pixels"][1].any()


def test_drops_happen_at_their_rates(shard_dirs):
    raw = _raw(shard_dirs["val"])[0]
    decode = DecodeSample(SampleConfig(resolution=32, clip_size=16, ref_size=32, clip_drop=0.3, caption_drop=0.2))
    rng = random.Random(0)
    outs = [decode(raw, rng, train=True) for _ in range(300)]
    clip_rate = np.mean([bool(o["drop"]) for o in outs])
    caption_rate = np.mean([o["caption"] == "" for o in outs])
    assert 0.22 < clip_rate < 0.38 and 0.13 < caption_rate < 0.27


def test_augmentation_keeps_mask_and_pixels_together():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 12:28] = True
    image[mask] = 255
    cfg = AugmentConfig(p_rotate=1.0, p_crop=1.0, p_pad=1.0)
    for _ in range(20):
        img, msk = augment_reference(image, mask, cfg, rng)
        assert msk.any() and img.shape[:2] == msk.shape
        assert img.shape[0] == img.shape[1]  # padded to a square
        # Pixels are white where the mask is (up to interpolation at the rim), black far outside.
        assert (img[msk].mean() > 150) and img[~msk].mean() < 100


def test_training_loader_counts_rejections_and_has_a_fixed_epoch(shard_dirs):
    dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])],
                         batch_size=2, num_workers=2, batches_per_epoch=7, shuffle_buffer=4, sample=SAMPLE)
    batches = list(dm.train_dataloader())
    assert len(batches) == 7
    assert all(b["pixels"].shape == (2, 3, 32, 32) for b in batches)
    rejected = sum(sum(b["rejected"].values()) for b in batches)
    assert rejected > 0 and all(set(b["rejected"]) <= {"undecodable png"} for b in batches)


def test_validation_loader_reads_every_sample_once_deterministically(shard_dirs):
    dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])],
                         batch_size=3, num_workers=1, sample=SAMPLE)
    first = list(dm.val_dataloader())
    second = list(dm.val_dataloader())
    keys = [k for b in first for k in b["key"]]
    assert sorted(keys) == [f"test-000000-{i:06d}" for i in range(4)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["ref_pixels"], b["ref_pixels"])


def test_validation_is_shared_between_ranks_without_overlap(shard_dirs, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])],
                             batch_size=3, num_workers=0, sample=SAMPLE)
        seen.append({k for b in dm.val_dataloader() for k in b["key"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"test-000000-{i:06d}" for i in range(4)}


def test_each_epoch_draws_a_new_stream(shard_dirs):
    dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], batch_size=2, num_workers=1,
                         batches_per_epoch=4, shuffle_buffer=1, sample=SAMPLE)
    loader = dm.train_dataloader()
    epochs = [[(k, b["drop"].tolist()) for b in loader for k in b["key"]] for _ in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # ... and a run resumed at another step does not replay the first run's stream.
    class _Trainer:
        global_step = 40

    resumed = ShardDataModule(train_shards=[str(shard_dirs["train"])], batch_size=2, num_workers=1,
                              batches_per_epoch=4, shuffle_buffer=1, sample=SAMPLE)
    resumed.trainer = _Trainer()
    assert [k for b in resumed.train_dataloader() for k in b["key"]] != [k for k, _ in epochs[0]]


def test_training_stream_is_the_same_in_a_rerun(shard_dirs):
    # Two data modules of the same seed, as two runs of one config: the same keys, pixels and drops
    # in the same order (the shuffle buffer included), over several epochs of persistent workers.
    def stream(seed: int) -> list[tuple]:
        dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], batch_size=2, num_workers=2,
                             batches_per_epoch=4, shuffle_buffer=6, seed=seed, sample=SAMPLE)
        loader = dm.train_dataloader()
        return [(k, float(b["pixels"].sum()), b["drop"].tolist()) for _ in range(2) for b in loader for k in b["key"]]

    first = stream(0)
    assert first == stream(0)
    assert first != stream(1)


def _random_bytes_shards(folder, count):
    """`count` shards whose stats files are valid and whose tars are random bytes."""
    write_shards(folder, shards=count, per_shard=3)
    for shard in range(count):
        (folder / f"{shard:06d}.tar").write_bytes(np.random.default_rng(shard).bytes(30_000))
    return folder


@pytest.mark.parametrize("count", [1, 3])
def test_training_stream_of_unreadable_shards_stops_naming_them(tmp_path, count):
    folder = _random_bytes_shards(tmp_path / "bad", count)
    dm = ShardDataModule(train_shards=[str(folder)], batch_size=2, num_workers=0, batches_per_epoch=5, sample=SAMPLE)
    with pytest.raises(UnreadableShards) as err:
        next(iter(dm.train_dataloader()))
    message = UnreadableShards.one_line(err.value)
    # Three reads of each listed shard, all in a row without a sample, then the end.
    assert message.startswith(f"no sample from any of the {count} shards in {3 * count} reads in a row: ")
    assert all(str(folder / f"{shard:06d}.tar") in message for shard in range(count)) and "\n" not in message


def test_unreadable_shards_stop_a_loader_worker_with_the_same_one_line(tmp_path):
    folder = _random_bytes_shards(tmp_path / "bad", 1)
    dm = ShardDataModule(train_shards=[str(folder)], batch_size=2, num_workers=1, batches_per_epoch=5, sample=SAMPLE)
    with pytest.raises(UnreadableShards) as err:
        next(iter(dm.train_dataloader()))
    assert "DataLoader worker" in str(err.value)  # torch's wrapping, which one_line looks through
    assert UnreadableShards.one_line(err.value) == (f"no sample from any of the 1 shards in 3 reads in a row: "
                                                    f"{folder / '000000.tar'} (ReadError)")


def test_one_readable_shard_keeps_the_stream_going_and_the_other_counts_its_losses(tmp_path):
    folder = _random_bytes_shards(tmp_path / "mixed", 1)
    write_shards(tmp_path / "good", shards=1, per_shard=4)
    (tmp_path / "good" / "000000.tar").rename(folder / "000001.tar")
    (tmp_path / "good" / "000000.stats.json").rename(folder / "000001.stats.json")
    dm = ShardDataModule(train_shards=[str(folder)], batch_size=2, num_workers=0, batches_per_epoch=30,
                         shuffle_buffer=1, sample=SAMPLE)
    batches = list(dm.train_dataloader())
    assert len(batches) == 30
    lost = [n for b in batches for reason, n in b["rejected"].items()]
    assert lost and all(n % 3 == 0 for n in lost)  # whole reads of the 3-sample random-bytes shard


def _cut(tar_path, index, inside):
    """Truncate a shard at the first member of sample `index` (its header, or half-way into its data)."""
    with tarfile.open(tar_path) as tar:
        first = next(m for m in tar.getmembers() if m.name.split(".")[0].endswith(f"-{index:06d}"))
    size = first.offset_data + first.size // 2 if inside else first.offset
    with open(tar_path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("inside", [False, True], ids=["at-a-sample", "mid-member"])
def test_a_truncated_shard_counts_the_samples_it_lost(tmp_path, inside):
    folder = write_shards(tmp_path / "cut", shards=1, per_shard=6)
    _cut(folder / "000000.tar", 4, inside)  # samples 4 and 5 are lost
    dm = ShardDataModule(train_shards=[str(folder)], batch_size=2, num_workers=0, batches_per_epoch=7,
                         shuffle_buffer=1, sample=SAMPLE)
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(set(keys)) == [f"test-000000-{i:06d}" for i in range(4)]
    # Each read of the shard ends after sample 3; its loss is reported with a later batch, so every
    # read but the one still going when the epoch ends has been counted: 2 samples each.
    finished_reads = keys.count("test-000000-000000") - 1
    assert finished_reads >= 2
    assert sum(sum(b["rejected"].values()) for b in batches) == 2 * finished_reads


def _single_subject_keys(folder) -> set[str]:
    """Keys whose json lists one subject, read from the shards without the training decode."""
    return {raw["__key__"] for tar in sorted(folder.glob("*.tar"))
            for raw in wds.WebDataset(str(tar), shardshuffle=False)
            if len(json.loads(raw["json"])["subjects"]) == 1}


def test_max_image_subjects_trains_on_single_subject_images_and_validates_on_all(shard_dirs):
    # The test shards hold 1, 2 and 3 subjects in turn: a third of the samples qualify.
    sample = SampleConfig(resolution=32, clip_size=16, ref_size=32, max_subjects=1, max_image_subjects=1)
    dm = ShardDataModule(train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])],
                         batch_size=1, num_workers=0, batches_per_epoch=12, shuffle_buffer=1, sample=sample)
    batches = list(dm.train_dataloader())
    trained = {k for b in batches for k in b["key"]}
    # The first sample of each train shard is corrupt: rejected (and counted) before any selection.
    assert trained == _single_subject_keys(shard_dirs["train"]) - {"test-000000-000000", "test-000001-000000"}
    assert len(trained) == 2 and all(b["valid"].sum() == 1 for b in batches)
    # Images with more subjects are not selected, which is not a rejection.
    assert {reason for b in batches for reason in b["rejected"]} == {"undecodable png"}
    validated = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(validated) == 4  # validation keeps every image


def test_a_stream_with_no_selectable_sample_stops_with_one_line_instead_of_hanging(shard_dirs):
    raw = [r for r in _raw(shard_dirs["val"]) if len(json.loads(r["json"])["subjects"]) > 1]
    sample = SampleConfig(resolution=32, clip_size=16, ref_size=32, max_subjects=1, max_image_subjects=1)
    stage = DecodeAndBatch(DecodeSample(sample), batch_size=1, counter=RejectCounter(), train=True, seed=0,
                           max_unselected=4)
    with pytest.raises(UnreadableShards, match=r"^data.sample.max_image_subjects=1: none of 4 training samples in a "
                                               r"row has at most 1 subjects$"):
        list(stage(iter(raw * 2)))  # the val shard's 2 multi-subject samples, twice: 4 skipped in a row
    single = [r for r in _raw(shard_dirs["val"]) if len(json.loads(r["json"])["subjects"]) == 1][:1]
    batches = list(stage(iter(raw + single + raw)))  # 2 skipped, one selected, 2 skipped: never 4 in a row
    assert [b["key"] for b in batches] == [[single[0]["__key__"]]]
