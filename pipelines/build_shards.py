"""Build unpaired and/or paired subject shards.

    python pipelines/build_shards.py --params params.yaml [--kind unpaired|paired|all] [--out PATH_OR_URL]
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/build_shards.py ...

Attaches to the Ray cluster named by RAY_ADDRESS (set by `ray job submit`), else starts a local one.
A rerun skips shards whose stats file exists and redoes the rest.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from pipelines.build import run_build
from pipelines.config import KINDS, load_data_config
from pipelines.summary import format_summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    ap.add_argument("--out", default=None, help="output root, a path or fsspec URL (default: data.out_dir)")
    ap.add_argument("--runner", choices=["ray", "local"], default="ray",
                    help="local: the same stages in this one process, without Ray (debugging)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="override a params key, e.g. --set data.filter.min_score=0.5")
    return ap.parse_args(argv)


def init_ray(num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data."):
            raise SystemExit(f"--set {item!r}: expected data.<key>=<value>")
        overrides[key[len("data."):]] = yaml.safe_load(value)
    cfg = load_data_config(args.params, overrides)  # every error in params stops us here, before any work
    if cfg.annotate.mode == "auto":
        from pipelines.stages.auto import build_auto_config

        build_auto_config(cfg.annotate.auto.model)
    out = args.out or cfg.out_dir
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    kinds = [k for k in kinds if getattr(cfg.sources, k)]
    if not kinds:
        raise SystemExit(f"no sources configured for --kind {args.kind} (data.sources)")
    print(f"building {', '.join(kinds)} shards into {out}", flush=True)
    # Ray starts only when some shard is pending: a rerun of a finished build returns at once.
    results = [run_build(cfg, kind, out, args.runner, start_ray=lambda: init_ray(cfg.ray.num_cpus))
               for kind in kinds]
    print(format_summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
