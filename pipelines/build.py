"""Plan the shards of one kind, skip the done ones, run the rest with Ray Data (or locally)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.config import PIPELINE_VERSION, ConfigError, DataConfig, params_hash
from pipelines.runner import Group, make_groups, run_local
from pipelines.shards.storage import ShardStore
from pipelines.sources import build_source


def _local_files(units: Any) -> list[str]:
    """Paths of existing local files named anywhere in a unit list."""
    if isinstance(units, str):
        return [units] if os.path.isfile(units) else []
    if isinstance(units, dict):
        units = list(units.values())
    if isinstance(units, (list, tuple)):
        return [p for u in units for p in _local_files(u)]
    return []


def units_digest(units: Any) -> str:
    """What a shard is made from: the units (file names, given annotations) and the size and mtime
    of every local file they name, so that an input rewritten under the same name redoes its shard."""
    files = sorted(set(_local_files(units)))
    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([units, stamps], sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_shards(cfg: DataConfig, kind: str) -> list[dict[str, Any]]:
    """Every shard of `kind`, numbered in source order; the same params give the same plan."""
    per_shard = cfg.shards.images_per_shard if kind == "unpaired" else cfg.shards.videos_per_shard
    h = params_hash(cfg, kind)
    specs = []
    for i, source_cfg in enumerate(getattr(cfg.sources, kind)):
        planned = build_source(source_cfg).plan(per_shard)
        if not planned:
            # An empty source is a mistake (a typo, an unmounted disk), never a reason to delete shards.
            raise ConfigError(f"data.sources.{kind}[{i}] ({source_cfg.name!r}) found no inputs")
        for units in planned:
            digest = units_digest(units)
            specs.append({"kind": kind, "shard": len(specs), "source": source_cfg.name, "source_cfg": source_cfg,
                          "units": units, "units_sha256": digest, "params_hash": h,
                          "pipeline_version": PIPELINE_VERSION})
    return specs


@dataclass
class BuildResult:
    kind: str
    out: str
    planned: int
    skipped: int
    stats: list[dict[str, Any]] = field(default_factory=list)  # shards written by this run
    wall_s: float = 0.0
    removed: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        rejected, dropped = Counter(), Counter()
        for s in self.stats:
            rejected.update(s["rejected"])
            dropped.update(s["dropped"])
        samples = sum(s["samples"] for s in self.stats)
        return {"inputs": sum(s["inputs"] for s in self.stats), "written": sum(s["written"] for s in self.stats),
                "samples": samples, "rejected": dict(rejected), "dropped": dict(dropped),
                "samples_per_s": samples / self.wall_s if self.wall_s > 0 else 0.0}


class _TaskFn:
    """Ray Data task UDF: one payload row per shard through a group of stages."""

    def __init__(self, group: Group):
        self.group = group
        self.__name__ = group.name  # names the operator in Ray Data's progress and stats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _apply(self.group, batch)


class annotate_auto:  # noqa: N801 - the class name is the operator's name in Ray Data's progress
    """Ray Data actor UDF: like _TaskFn, but the group (and its model weights) lives as long as the actor."""

    def __init__(self, group: Group):
        self.group = group

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _apply(self.group, batch)


def _apply(group: Group, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # The payload crosses process boundaries as one pickled blob: rows hold nested, variable-shape
    # annotations and arrays that Arrow cannot type, and pickle protocol 5 moves arrays without copies.
    out = [group(pickle.loads(p)) for p in batch["payload"]]
    return {"payload": np.array([pickle.dumps(p, protocol=5) for p in out], dtype=object)}


def _run_ray(payloads: list[dict[str, Any]], groups: list[Group]) -> list[dict[str, Any]]:
    import ray

    ds = ray.data.from_items([{"payload": pickle.dumps(p, protocol=5)} for p in payloads],
                             override_num_blocks=len(payloads))
    if len(groups) == 1:
        # One operator: Ray Data's per-operator resource reservation (meant to keep a multi-operator
        # pipeline from starving its later stages) only holds CPUs back; measured here, it ran about
        # one shard at a time on 2 CPUs. With several operators it stays on.
        ds.context.op_resource_reservation_enabled = False
    for g in groups:
        if g.compute == "actors":
            ds = ds.map_batches(annotate_auto, fn_constructor_args=(g,), batch_size=1, concurrency=g.concurrency,
                                num_gpus=g.num_gpus or None, num_cpus=1 if not g.num_gpus else None)
        else:
            ds = ds.map_batches(_TaskFn(g), batch_size=1, num_cpus=1)
    return [pickle.loads(row["payload"])["stats"] for row in ds.iter_rows()]


def _is_fresh(stats: dict[str, Any] | None, spec: dict[str, Any]) -> bool:
    """Done, and made from the same inputs, params and pipeline version: nothing to redo."""
    return stats is not None and all(stats.get(k) == spec[k] for k in ("params_hash", "pipeline_version",
                                                                        "units_sha256"))


def run_build(cfg: DataConfig, kind: str, out_url: str, runner: str = "ray",
              start_ray: Callable[[], None] | None = None) -> BuildResult:
    """Build the pending shards of `kind`. `start_ray` runs only if there is work for Ray to do."""
    start = time.perf_counter()
    out = posixpath.join(out_url.rstrip("/"), kind)
    store = ShardStore(out)
    store.makedirs()
    specs = plan_shards(cfg, kind)
    done = store.done()
    pending = [s for s in specs if not _is_fresh(done.get(s["shard"]), s)]
    removed = store.clean_temps({s["shard"] for s in pending})
    # A stale shard stops counting as done before its new tar is published: stats first.
    for s in pending:
        if s["shard"] in done:
            store.remove(f"{s['shard']:06d}.stats.json")
    # Published shards the current plan does not have (fewer inputs than before): not ours any more.
    for n in sorted(set(done) - {s["shard"] for s in specs}):
        for name in (f"{n:06d}.stats.json", f"{n:06d}.tar"):  # stats first: a shard is never half-present
            store.remove(name)
            removed.append(name)
    groups = make_groups(cfg, kind, out)
    payloads = [{"spec": s, "rows": None, "timings": {}} for s in pending]
    if not payloads:
        stats = []
    elif runner == "local":
        stats = [run_local(p, groups) for p in payloads]
    else:
        if start_ray is not None:
            start_ray()
        stats = _run_ray(payloads, groups)
    stats.sort(key=lambda s: s["shard"])
    return BuildResult(kind, out, len(specs), len(specs) - len(pending), stats, time.perf_counter() - start, removed)
