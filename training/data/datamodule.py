"""LightningDataModule over shard folders (the contract of DESIGN.md), with webdataset: resampled
shards and a fixed number of batches per epoch for training, each shard once for validation;
decode errors, unusable samples and the samples a damaged shard lost are counted by reason and
skipped. Only a training stream in which no listed shard yields anything is fatal (it would
otherwise draw unreadable shards forever)."""

from __future__ import annotations

import glob
import json
import os
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import webdataset as wds

from training.data.cached import DecodeCached, cache_shards, check_manifest, read_manifest, read_null
from training.data.sample import DecodeSample, NotSelected, SampleConfig, SampleError, collate


def _is_url(location: str) -> bool:
    """pipe:, http:, s3: ... (file: is a local path)."""
    return ":" in location.split("/")[0] and not location.startswith("file:")


def stats_path(shard: str) -> str | None:
    """The stats file beside a local shard; None for a URL."""
    return None if _is_url(shard) else shard[: -len(".tar")] + ".stats.json"


class NoShards(FileNotFoundError):
    """A shard location holds no complete shard."""


def list_shards(locations: list[str]) -> list[str]:
    """Complete shards under the given folders or globs: a tar counts only when its stats file,
    written after the tar, exists. Explicit URLs (pipe:, http:) pass through unchanged."""
    shards: list[str] = []
    for loc in locations:
        if _is_url(loc):
            shards.append(loc)
            continue
        loc = loc.removeprefix("file://")
        pattern = os.path.join(loc, "*.tar") if os.path.isdir(loc) else loc
        for tar in sorted(glob.glob(pattern)):
            if os.path.exists(stats_path(tar)):
                shards.append(tar)
    if not shards:
        raise NoShards(f"no complete shards (NNNNNN.tar with its NNNNNN.stats.json) in {locations}")
    return shards


def listed_samples(stats_file: str) -> int | None:
    """How many samples a shard's stats file says its tar holds; None when it cannot tell."""
    try:
        with open(stats_file) as handle:
            stats = json.load(handle)
        # `samples` counts the tar's samples; stats of older builds only have `written` (inputs).
        return int(stats.get("samples", stats.get("written")))
    except (OSError, TypeError, ValueError, AttributeError):
        return None


class UnreadableShards(RuntimeError):
    """No training sample the run can use (no listed shard yields one, or none is selected): no step can be made."""

    @staticmethod
    def one_line(err: BaseException) -> str:
        """The message, also when a loader worker raised it (torch re-raises it in the main process
        with the worker's traceback in front: the message is then the last line)."""
        last = str(err).strip().splitlines()[-1]
        return last.split(f"{UnreadableShards.__name__}: ", 1)[-1]


@dataclass
class RejectCounter:
    """Rejections inside one loader worker; reported with, then cleared by, the next batch."""

    counts: Counter = field(default_factory=Counter)

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


class ErrorNames(list):
    """webdataset error handler: notes the error's type name and goes on with the rest of the
    shard, or the next one."""

    def __call__(self, exn: Exception) -> bool:
        self.append(type(exn).__name__)
        return True


@dataclass
class ReadShards:
    """Pipeline stage: shard URLs -> raw samples, one shard at a time, so that each shard's outcome
    is known. A shard that yields fewer samples than its stats file lists (truncated, damaged,
    unreadable) adds the missing samples to the rejections; a shard without stats (a URL) adds one
    count per read error instead. In a resampled (endless) stream, `max_failures` reads of every
    listed shard in a row without a single sample raise UnreadableShards: nothing is left to train on."""

    shards: list[str]
    counter: RejectCounter
    max_failures: int = 3
    expected: dict[str, int | None] = field(default_factory=dict)  # per worker: each stats file read once

    def _expected(self, url: str) -> int | None:
        if url not in self.expected:
            path = stats_path(url)
            self.expected[url] = None if path is None else listed_samples(path)
        return self.expected[url]

    def __call__(self, sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        fruitless, failed = 0, {}  # reads in a row without a sample; the last error of each such shard
        for source in sources:
            url = source["url"]
            errors = ErrorNames()
            seen = 0
            # A consumer that stops mid-shard (end of an epoch) never reaches the accounting below.
            for sample in wds.tarfile_samples([{"url": url}], handler=errors):
                seen += 1
                yield sample
            expected = self._expected(url)
            why = errors[-1] if errors else "ended early"
            if expected is not None and seen < expected:
                self.counter.counts[f"shard {why}: samples missing"] += expected - seen
            elif expected is None:
                for error in errors:
                    self.counter.counts[f"tar: {error}"] += 1
            if seen:
                fruitless, failed = 0, {}
                continue
            fruitless, failed[url] = fruitless + 1, why
            if fruitless >= self.max_failures * len(self.shards):
                names = [f"{name} ({failed[name]})" for name in sorted(failed)]
                listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                raise UnreadableShards(f"no sample from any of the {len(self.shards)} shards in {fruitless} "
                                       f"reads in a row: {listed}")


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
    """Pipeline stage: raw samples -> collated batches with a `rejected` count per reason. Rows are
    batched by target size (their aspect-ratio bucket, or the one square): a batch holds one size."""

    decode: DecodeSample | DecodeCached
    batch_size: int
    counter: RejectCounter
    train: bool
    seed: int
    epoch: int = 0  # counts this worker's passes, so each epoch draws new augmentations and drops
    # Samples in a row that data.sample.max_image_subjects skips before the stream is declared empty
    # for this run (an endless stream would otherwise hang without a step).
    max_unselected: int = 10_000

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{info}-{self.epoch}")
        self.epoch += 1
        pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}  # target size -> rows
        unselected = 0
        for raw in samples:
            sample_rng = rng if self.train else random.Random(zlib.crc32(raw.get("__key__", "").encode()))
            try:
                row = self.decode(raw, sample_rng, train=self.train)
            except SampleError as err:
                self.counter.counts[str(err)] += 1
                continue
            except NotSelected:
                unselected += 1
                if unselected >= self.max_unselected:
                    limit = self.decode.config.max_image_subjects
                    raise UnreadableShards(f"data.sample.max_image_subjects={limit}: none of {unselected} training "
                                           f"samples in a row has at most {limit} subjects") from None
                continue
            unselected = 0
            size = tuple(row["masks"].shape[-2:])
            rows = pending.setdefault(size, [])
            rows.append(row)
            if len(rows) == self.batch_size:
                yield {**collate(pending.pop(size)), "rejected": self.counter.take()}
        if not self.train:
            for rows in pending.values():
                yield {**collate(rows), "rejected": self.counter.take()}


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
        cache_dir: str | None = None,  # the encoder cache of train_shards (python -m training.cache)
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sample = sample or SampleConfig()

    def _stream_seed(self) -> int:
        """The run's seed, moved on by the step a resumed run starts from, so that a resumed run
        does not replay the stream of the first run."""
        step = self.trainer.global_step if self.trainer is not None else 0
        return self.hparams.seed + 1_000_003 * step

    def _encoder_cache(self, shards: list[str]) -> tuple[list[str], DecodeCached]:
        """The cache shards of the training shards and their decode, after checking that the cache
        fits this run (sample settings, the model's base when a trainer is attached) and is current."""
        cache_dir = self.hparams.cache_dir
        manifest = read_manifest(cache_dir)
        module = self.trainer.lightning_module if self.trainer is not None else None
        check_manifest(cache_dir, manifest, self.sample, dict(module.hparams) if module is not None else None)
        return cache_shards(cache_dir, shards, manifest), DecodeCached(self.sample, read_null(cache_dir))

    def _pipeline(self, locations: list[str], train: bool) -> wds.DataPipeline:
        counter = RejectCounter()
        shards = list_shards(locations)
        decode: DecodeSample | DecodeCached = DecodeSample(self.sample)
        if train and self.hparams.cache_dir:
            # Validation stays uncached: it wants every sample un-augmented, not one of the cached draws.
            shards, decode = self._encoder_cache(shards)
        stages: list[Any] = []
        seed = self._stream_seed()
        if train:
            # Every rank and worker draws shards with replacement from its own seed: no split needed.
            # The shard list keeps its own epoch count in persistent workers: each epoch differs.
            stages.append(wds.ResampledShards(shards, seed=seed, deterministic=True))
        else:
            stages += [wds.SimpleShardList(shards), wds.split_by_worker]
        stages.append(ReadShards(shards, counter))
        if not train:
            stages.append(RankShare())
        if train and self.hparams.shuffle_buffer > 1:
            stages.append(SeededShuffle(self.hparams.shuffle_buffer, min(64, self.hparams.shuffle_buffer), seed))
        batch_size = self.hparams.batch_size if train else (self.hparams.val_batch_size or self.hparams.batch_size)
        stages.append(DecodeAndBatch(decode, batch_size, counter, train, seed))
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
