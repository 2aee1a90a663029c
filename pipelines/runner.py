"""How a shard moves through the stages, with or without Ray.

A shard travels as a payload {spec, rows, timings}. Stages are grouped: consecutive CPU stages run
together in one Ray task per shard (no serialisation between them); a model stage is its own group,
run by a pool of Ray actors that load weights once. `run_local` applies the very same groups in
this process, which is what the single-process benchmark baseline and `--runner local` use.

Three kinds of step, typed as such: the shard's `Source` (its spec -> the input rows) opens the first
group, `Stage`s (rows -> rows, pipelines/stages) follow, and its `Sink` (spec, rows, timings -> stats)
closes the last group. Only the source and the sink do I/O, and they need what a stage never sees
(the spec, the timings the stats file records), so they are not stages with a special name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pipelines.batch import Batch, ensure_column, from_rows, reject
from pipelines.config import DataConfig
from pipelines.shards.writer import WriteShard
from pipelines.sources import build_source
from pipelines.stages import Stage
from pipelines.stages.annotate_auto import AnnotateAuto
from pipelines.stages.annotate_given import AnnotateGiven
from pipelines.stages.decode import DecodeImages
from pipelines.stages.decode_video import DecodeVideos
from pipelines.stages.encode import EncodeSamples
from pipelines.stages.filter import DropDuplicates, DropNearDuplicates, FilterSubjects
from pipelines.stages.frames import frames_to_images, images_to_frames
from pipelines.stages.pairs import MakePairs
from pipelines.stages.refs import CutReferences
from pipelines.stages.scenes import DetectScenes
from pipelines.stages.scores import ScoreImages

Payload = dict[str, Any]


class Source(Protocol):
    def __call__(self, spec: dict[str, Any]) -> Batch: ...


class Sink(Protocol):
    def __call__(self, spec: dict[str, Any], rows: Batch, timings: dict[str, float]) -> dict[str, Any]: ...


@dataclass
class ReadShard:
    """The only source I/O: records of the shard's units."""

    def __call__(self, spec: dict[str, Any]) -> Batch:
        return from_rows(list(build_source(spec["source_cfg"]).read(spec["units"])))


@dataclass
class OnFrames:
    """Run an image stage on every sampled frame of the video rows, then fold results back.

    `video_reasons`: rejections whose cause is the video's, not its frames' (`no_labels`: the video
    has no caption or labels to prompt with). A video whose every frame got one of them is rejected
    for it, rather than later for what follows from it (`no_subjects`).
    """

    stage: Stage
    columns: tuple[str, ...] = ("subjects", "dropped")
    video_reasons: tuple[str, ...] = ()

    def __call__(self, batch: Batch) -> Batch:
        images, where = frames_to_images(batch)
        if where:
            images = self.stage(images)
        batch = images_to_frames(batch, images, where, self.columns)
        details = images.get("reject_detail") or [None] * len(where)
        first: dict[int, int] = {}  # video row -> its first frame's image row
        for i, (v, _) in enumerate(where):
            first.setdefault(v, i)
        for v, i in first.items():
            reasons = set(batch["frame_rejects"][v])
            if len(reasons) == 1 and (reason := reasons.pop()) in self.video_reasons:
                reject(batch, v, reason)
                ensure_column(batch, "reject_detail")[v] = details[i]
        return batch


@dataclass
class Group:
    """Steps that run together in one process: the shard's source (first group only), stages by name
    (built lazily: weights load in the worker), the shard's sink (last group only)."""

    name: str
    cfg: DataConfig
    kind: str
    stages: list[str]
    compute: Literal["tasks", "actors"] = "tasks"
    num_gpus: float = 0.0
    concurrency: int = 1
    source: Source | None = None
    sink: Sink | None = None
    _built: list[tuple[str, Stage]] | None = field(default=None, repr=False)

    def build(self, spec: dict[str, Any]) -> list[tuple[str, Stage]]:
        cfg, video = self.cfg, self.kind == "paired"
        make = {
            "decode": lambda: DecodeVideos(cfg.decode, cfg.video) if video else DecodeImages(cfg.decode),
            "scenes": lambda: DetectScenes(cfg.video),
            "dedupe": lambda: DropDuplicates(cfg.filter.dedupe),
            "near_dupes": lambda: DropNearDuplicates(frozenset(spec.get("near_duplicates") or ())),
            "score": lambda: (OnFrames(ScoreImages(cfg.filter.score_filters), ("scores",)) if video
                              else ScoreImages(cfg.filter.score_filters)),
            "annotate_given": lambda: OnFrames(AnnotateGiven()) if video else AnnotateGiven(),
            "annotate_auto": lambda: (
                OnFrames(AnnotateAuto(cfg.annotate.auto.model, cfg.annotate.auto.batch_size),
                         video_reasons=("no_labels",)) if video
                else AnnotateAuto(cfg.annotate.auto.model, cfg.annotate.auto.batch_size)),
            "filter": lambda: OnFrames(FilterSubjects(cfg.filter)) if video else FilterSubjects(cfg.filter),
            "refs": lambda: CutReferences(cfg.refs),
            "pairs": lambda: MakePairs(cfg.video, cfg.refs),
            "encode": lambda: EncodeSamples(spec["source"], self.kind, spec["params_hash"], cfg.shards),
        }
        return [(name, make[name]()) for name in self.stages]

    def __call__(self, payload: Payload) -> Payload:
        # Model groups keep their stages (weights) for the life of the actor; CPU stages are cheap and
        # rebuilt per shard, so per-shard state (the duplicate set) never leaks into another shard.
        if self.compute == "actors":
            self._built = self._built or self.build(payload["spec"])
            stages = self._built
        else:
            stages = self.build(payload["spec"])
        spec, timings = payload["spec"], payload.setdefault("timings", {})
        if self.source is not None:
            with _timed(timings, "read"):
                payload["rows"] = self.source(spec)
        for name, stage in stages:
            with _timed(timings, name):
                payload["rows"] = stage(payload["rows"])
        if self.sink is not None:
            with _timed(timings, "write"):  # after the sink: its stats record the timings before it
                payload["stats"] = self.sink(spec, payload["rows"], timings)
            payload["rows"] = None
        return payload


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def make_groups(cfg: DataConfig, kind: str, out_url: str) -> list[Group]:
    auto = cfg.annotate.mode == "auto"
    score = ["score"] if cfg.filter.score_filters else []
    if kind == "unpaired":
        first = ["decode", "dedupe", "near_dupes"] + ([] if auto else ["annotate_given"])
        last = ["filter", *score, "refs", "encode"]
    else:
        first = ["decode", "scenes"] + ([] if auto else ["annotate_given"])
        last = ["filter", *score, "pairs", "encode"]
    read, write = ReadShard(), WriteShard(out_url)
    if not auto:
        return [Group("build", cfg, kind, first + last, source=read, sink=write)]
    a = cfg.annotate.auto
    return [Group("prepare", cfg, kind, first, source=read),
            Group("annotate_auto", cfg, kind, ["annotate_auto"], "actors", a.num_gpus, a.concurrency),
            Group("finish", cfg, kind, last, sink=write)]


def run_local(payload: Payload, groups: list[Group]) -> dict[str, Any]:
    for g in groups:
        payload = g(payload)
    return payload["stats"]
