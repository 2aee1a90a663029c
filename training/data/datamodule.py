"""LightningDataModule over shard folders (the contract of DESIGN.md), with webdataset: resampled
shards and a fixed number of batches per epoch for training, each shard once for validation;
decode errors and unusable samples are counted by reason and skipped, never fatal."""

from __future__ import annotations

import glob
import os
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import webdataset as wds

from training.data.sample import DecodeSample, SampleConfig, SampleError, collate


def list_shards(locations: list[str]) -> list[str]:
    """Complete shards under the given folders or globs: a tar counts only when its stats file,
    written after the tar, exists. Explicit URLs (pipe:, http:) pass through unchanged."""
    shards: list[str] = []
    for loc in locations:
        if ":" in loc.split("/")[0] and not loc.startswith("file:"):
            shards.append(loc)
            continue
        loc = loc.removeprefix("file://")
        pattern = os.path.join(loc, "*.tar") if os.path.isdir(loc) else loc
        for tar in sorted(glob.glob(pattern)):
            if os.path.exists(tar[: -len(".tar")] + ".stats.json"):
                shards.append(tar)
    if not shards:
        raise FileNotFoundError(f"no complete shards (NNNNNN.tar with its NNNNNN.stats.json) in {locations}")
    return shards


@dataclass
class RejectCounter:
    """Rejections inside one loader worker; reported with, then cleared by, the next batch."""

    counts: Counter = field(default_factory=Counter)

    def tar_error(self, exn: Exception) -> bool:
        self.counts[f"tar: {type(exn).__name__}"] += 1
        return True  # go on with the next sample / shard

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


@dataclass
class RankShare:
    """Validation: every rank reads every shard and keeps the samples whose key hashes to it, so
    each sample is evaluated exactly once however few shards there are."""

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        for sample in samples:
            if zlib.crc32(sample.get("__key__", "").encode()) % world == rank:
                yield sample


@dataclass
class SeededShuffle:
    """webdataset's shuffle buffer with a seed of this run, rank, worker and pass: its default seed
    is the pid and the clock, and a rerun would train on another order."""

    bufsize: int
    initial: int
    seed: int
    passes: int = 0

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.passes += 1  # a persistent worker keeps this object: each epoch draws another order
        rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.passes, self.seed))
        yield from wds.shuffle(self.bufsize, self.initial, rng=rng)(samples)


@dataclass
class DecodeAndBatch:
    """Pipeline stage: raw samples -> collated batches with a `rejected` count per reason."""

    decode: DecodeSample
    batch_size: int
    counter: RejectCounter
    train: bool
    seed: int
    epoch: int = 0  # counts this worker's passes, so each epoch draws new augmentations and drops

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{info}-{self.epoch}")
        self.epoch += 1
        pending: list[dict[str, Any]] = []
        for raw in samples:
            sample_rng = rng if self.train else random.Random(zlib.crc32(raw.get("__key__", "").encode()))
            try:
                pending.append(self.decode(raw, sample_rng, train=self.train))
            except SampleError as err:
                self.counter.counts[str(err)] += 1
                continue
            if len(pending) == self.batch_size:
                yield {**collate(pending), "rejected": self.counter.take()}
                pending = []
        if pending and not self.train:
            yield {**collate(pending), "rejected": self.counter.take()}


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: list[str],
        val_shards: list[str] | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 100,
        shuffle_buffer: int = 256,
        seed: int = 0,
        sample: SampleConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sample = sample or SampleConfig()

    def _stream_seed(self) -> int:
        """The run's seed, moved on by the step a resumed run starts from, so that a resumed run
        does not replay the stream of the first run."""
        step = self.trainer.global_step if self.trainer is not None else 0
        return self.hparams.seed + 1_000_003 * step

    def _pipeline(self, locations: list[str], train: bool) -> wds.DataPipeline:
        counter = RejectCounter()
        shards = list_shards(locations)
        stages: list[Any] = []
        seed = self._stream_seed()
        if train:
            # Every rank and worker draws shards with replacement from its own seed: no split needed.
            # The shard list keeps its own epoch count in persistent workers: each epoch differs.
            stages.append(wds.ResampledShards(shards, seed=seed, deterministic=True))
        else:
            stages += [wds.SimpleShardList(shards), wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=counter.tar_error))
        if not train:
            stages.append(RankShare())
        if train and self.hparams.shuffle_buffer > 1:
            stages.append(SeededShuffle(self.hparams.shuffle_buffer, min(64, self.hparams.shuffle_buffer), seed))
        batch_size = self.hparams.batch_size if train else (self.hparams.val_batch_size or self.hparams.batch_size)
        stages.append(DecodeAndBatch(DecodeSample(self.sample), batch_size, counter, train, seed))
        return wds.DataPipeline(*stages)

    def _loader(self, pipeline: wds.DataPipeline, workers: int, persistent: bool = False) -> wds.WebLoader:
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                             persistent_workers=persistent and workers > 0, pin_memory=False)

    def train_dataloader(self) -> wds.WebLoader:
        # Persistent workers keep their pipeline objects, whose epoch counters move the stream on.
        loader = self._loader(self._pipeline(self.hparams.train_shards, train=True), self.hparams.num_workers,
                              persistent=True)
        # A fixed epoch length per rank: resampled streams are endless.
        return loader.with_epoch(self.hparams.batches_per_epoch)

    def val_dataloader(self) -> wds.WebLoader:
        if not self.hparams.val_shards:
            return []
        workers = min(self.hparams.num_workers, len(list_shards(self.hparams.val_shards)))
        return self._loader(self._pipeline(self.hparams.val_shards, train=False), workers)
