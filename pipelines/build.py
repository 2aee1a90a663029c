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
from pipelines.near_dupes import mark_near_duplicates
from pipelines.runner import Group, make_groups, run_local
from pipelines.shards.storage import ShardStore, shard_files
from pipelines.sources import build_source
from pipelines.sources.base import SourceError


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
        try:
            planned = build_source(source_cfg).plan(per_shard)
        except SourceError as err:
            raise ConfigError(f"data.sources.{kind}[{i}].{err}") from err
        except OSError as err:  # unreadable input listings: still the user's to fix, one line
            raise ConfigError(f"data.sources.{kind}[{i}] ({source_cfg.name!r}): {err}") from err
        if not planned:
            # An empty source is a mistake (a typo, an unmounted disk), never a reason to delete shards.
            raise ConfigError(f"data.sources.{kind}[{i}] ({source_cfg.name!r}) found no inputs")
        for units in planned:
            digest = units_digest(units)
            specs.append({"kind": kind, "shard": len(specs), "source": source_cfg.name, "source_cfg": source_cfg,
                          "units": units, "units_sha256": digest, "params_hash": h,
                          "pipeline_version": PIPELINE_VERSION})
    return specs


class BuildError(Exception):
    """A build refused before publishing: it would lose published samples or a source gave nothing."""

    def __init__(self, message: str, failed_source: str | None = None):
        super().__init__(message)
        self.failed_source = failed_source  # the source all of whose inputs failed, if that is the cause


@dataclass
class BuildResult:
    kind: str
    out: str
    planned: int
    skipped: int
    stats: list[dict[str, Any]] = field(default_factory=list)  # shards written by this run
    wall_s: float = 0.0
    removed: list[tuple[str, str]] = field(default_factory=list)  # published files removed, and why
    replaced: list[tuple[int, int, int, str]] = field(default_factory=list)  # (shard, samples before, after, why)
    cleaned: list[str] = field(default_factory=list)  # temporary files of a killed run

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


class _ActorFn:
    """Ray Data actor UDF: like _TaskFn, but the group (and its model weights) lives as long as the actor.
    Ray Data names an actor operator after the class: `_run_ray` subclasses this one under the group's name."""

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
            actor_fn = type(g.name, (_ActorFn,), {})  # named as the group in Ray Data's progress
            ds = ds.map_batches(actor_fn, fn_constructor_args=(g,), batch_size=1, concurrency=g.concurrency,
                                num_gpus=g.num_gpus or None, num_cpus=1 if not g.num_gpus else None)
        else:
            ds = ds.map_batches(_TaskFn(g), batch_size=1, num_cpus=1)
    return [pickle.loads(row["payload"])["stats"] for row in ds.iter_rows()]


def _is_fresh(stats: dict[str, Any] | None, spec: dict[str, Any]) -> bool:
    """Done, and made from the same inputs, params and pipeline version: nothing to redo."""
    return stats is not None and all(stats.get(k) == spec[k] for k in ("params_hash", "pipeline_version",
                                                                        "units_sha256"))


def _why_redone(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key, what in (("params_hash", "params"), ("pipeline_version", "pipeline version"), ("units_sha256", "inputs")):
        if old.get(key) != new.get(key):
            return f"{what} changed"
    return "rebuilt"


def _by_source(stats: Any) -> dict[str, Counter]:
    """inputs / written / samples and rejections per source, over shard stats."""
    out: dict[str, Counter] = {}
    for st in stats:
        c = out.setdefault(st["source"], Counter())
        c.update(inputs=st["inputs"], written=st["written"], samples=st["samples"])
        c.update({f"rejected:{k}": v for k, v in st["rejected"].items()})
    return out


def _source_path(cfg: DataConfig, kind: str, name: str) -> str:
    i = next(i for i, s in enumerate(getattr(cfg.sources, kind)) if s.name == name)
    return f"data.sources.{kind}[{i}] ({name!r})"


def check_outcome(cfg: DataConfig, kind: str, specs: list[dict[str, Any]], new: dict[int, dict[str, Any]],
                  published: dict[int, dict[str, Any]], prune: bool) -> None:
    """Refuse (BuildError) a build whose outcome a user cannot have meant: a source all of whose inputs
    failed; or, without `prune`, fewer published samples of a source while the params are those it
    was published with (its inputs went: deleted files, an emptied listing), or of a source that is
    no longer configured. With changed params fewer samples are the change asked for (a stricter
    filter); the summary lists every shard replaced or removed."""
    after = _by_source(new.values())
    for src, c in after.items():
        if c["inputs"] and not c["written"]:
            reasons = ", ".join(f"{k.split(':', 1)[1]}={v}" for k, v in sorted(c.items()) if k.startswith("rejected:"))
            raise BuildError(f"{_source_path(cfg, kind, src)}: all {c['inputs']} inputs failed ({reasons}); "
                             "nothing published was changed", failed_source=src)
    if prune:
        return
    current = {s["params_hash"] for s in specs}
    planned = {s["shard"] for s in specs}
    for src, c in sorted(_by_source(published.values()).items()):
        mine = {n: st for n, st in published.items() if st["source"] == src}
        same_params = {st.get("params_hash") for st in mine.values()} <= current
        samples = after.get(src, Counter())["samples"]
        if samples < c["samples"] and (same_params or src not in after):
            gone = [f"{n:06d}" for n in sorted(mine) if n not in planned]
            raise BuildError(
                f"{kind} source {src!r}: this build would publish {samples} samples where {c['samples']} are"
                f" published" + (f" (shards {', '.join(gone)} would go)" if gone else "")
                + "; nothing published was changed; rerun with --prune to accept")


def run_build(cfg: DataConfig, kind: str, out_url: str, runner: str = "ray",
              start_ray: Callable[[], None] | None = None, prune: bool = False,
              specs: list[dict[str, Any]] | None = None) -> BuildResult:
    """Build the pending shards of `kind`. `start_ray` runs only if there is work for Ray to do.

    A pending shard that would replace a published one is built in staging; only when every shard
    of the kind is built and the outcome checked (check_outcome) are staged shards moved into place
    and the shards the plan no longer has removed. A refused build (BuildError) changes no published
    shard; its staged shards stay for the next run to reuse.
    """
    start = time.perf_counter()
    out = posixpath.join(out_url.rstrip("/"), kind)
    specs = plan_shards(cfg, kind) if specs is None else specs  # plan errors stop us before any write
    specs = mark_near_duplicates(cfg, kind, specs, out)  # across the whole build, so before any shard
    store = ShardStore(out)
    staging = store.staging()
    published, staged = store.done(), staging.done()
    final: dict[int, dict[str, Any]] = {}  # the stats each planned shard will have
    from_staging: set[int] = set()  # planned shards that replace published ones, built in staging
    pending = []
    for s in specs:
        n = s["shard"]
        if _is_fresh(published.get(n), s):
            final[n] = published[n]
            continue
        s = dict(s, staged=n in published or n in staged)
        if s["staged"]:
            from_staging.add(n)
        if s["staged"] and _is_fresh(staged.get(n), s):
            final[n] = staged[n]  # built by an earlier run that was refused or killed before publishing
        else:
            pending.append(s)
    store.makedirs()
    cleaned = store.clean_temps({s["shard"] for s in pending if not s["staged"]})
    cleaned += staging.clean_temps({s["shard"] for s in pending if s["staged"]})
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
    final.update((st["shard"], st) for st in stats)
    try:
        check_outcome(cfg, kind, specs, final, published, prune)
    except BuildError as err:
        # Shards this run wrote where nothing was published, for a source whose every input failed,
        # hold nothing anyone had: take them back, so the output is as the build found it.
        for st in stats:
            if st["source"] == err.failed_source and st["shard"] not in from_staging:
                for name in shard_files(st["shard"]):
                    store.remove(name)
        raise
    replaced, removed = [], []
    for n in sorted(from_staging):
        store.move_shard_from(staging, n)
        if n in published:
            replaced.append((n, published[n]["samples"], final[n]["samples"], _why_redone(published[n], final[n])))
    shards_of = Counter(st["source"] for st in final.values())
    for n in sorted(set(published) - set(final)):
        src = published[n]["source"]
        why = (f"source {src!r} now has {shards_of[src]} shard(s)" if src in shards_of
               else f"source {src!r} is no longer configured")
        for name in shard_files(n):
            if store.exists(name):
                store.remove(name)
                removed.append((name, f"not in the plan any more: {why}"))
    if staging.fs.exists(staging.root):  # what is left there is stale: other plans' shards
        staging.fs.rm(staging.root, recursive=True)
    return BuildResult(kind, out, len(specs), len(specs) - len(pending), stats, time.perf_counter() - start,
                       removed, replaced, cleaned)
