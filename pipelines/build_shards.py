"""Build unpaired and/or paired subject shards.

    python pipelines/build_shards.py --params params.yaml [--kind unpaired|paired|all] [--out PATH_OR_URL]
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/build_shards.py ...

Ray: `--address` (or RAY_ADDRESS, which `ray job submit` sets) attaches to that cluster; otherwise the
script starts a private local instance (`data.ray.num_cpus` CPUs), even when another Ray runs here.
A rerun skips shards whose stats file exists and redoes the rest. A rebuild that would publish fewer
samples of a source than are published is refused unless `--prune` is given.

Exit codes: 0 built; 2 a params or input error, found before any work (one line on stderr);
1 a build refused after its shards were built (one line; nothing published was changed).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.build import BuildError, plan_shards, run_build
from pipelines.config import KINDS, ConfigError, load_data_config
from pipelines.summary import format_summary

EXIT_REFUSED, EXIT_USER_ERROR = 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    ap.add_argument("--out", default=None, help="output root, a path or fsspec URL (default: data.out_dir)")
    ap.add_argument("--runner", choices=["ray", "local"], default="ray",
                    help="local: the same stages in this one process, without Ray (debugging)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to attach to (default: RAY_ADDRESS; neither: a private local instance)")
    ap.add_argument("--prune", action="store_true",
                    help="accept a rebuild that publishes fewer samples of a source (removed shards are listed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="override a params key, e.g. --set data.filter.min_score=0.5")
    return ap.parse_args(argv)


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """`data.a.b=VALUE` -> (`a.b`, VALUE); the params parser reads and checks VALUE as YAML."""
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data."):
            raise ConfigError(f"--set {item!r}: expected data.<key>=<value>")
        overrides.append((key[len("data."):], value))
    return overrides


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Attach to the cluster at `address`, or start a private local instance.

    A private instance is asked for explicitly (`address="local"`): a bare `ray.init()` would attach
    to whatever cluster `ray start` last left on this machine, and then fail on `num_cpus`.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        if num_cpus is not None:
            # An attached cluster has the size it was started with; ray.init refuses num_cpus there.
            print(f"warning: data.ray.num_cpus={num_cpus} ignored: attaching to the Ray cluster at {address}",
                  file=sys.stderr, flush=True)
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_data_config(args.params, parse_overrides(args.set))
        kinds = [k for k in (list(KINDS) if args.kind == "all" else [args.kind]) if getattr(cfg.sources, k)]
        if not kinds:
            raise ConfigError(f"data.sources: no sources configured for --kind {args.kind}")
        # Every kind is planned before any is built: an input error of the second stops the first too.
        plans = {kind: plan_shards(cfg, kind) for kind in kinds}
    except ConfigError as err:  # the user's to fix: one line, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    out = args.out or cfg.out_dir
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    print(f"building {', '.join(kinds)} shards into {out}", flush=True)
    results = []
    try:
        for kind in kinds:
            # Ray starts only when some shard is pending: a rerun of a finished build returns at once.
            results.append(run_build(cfg, kind, out, args.runner, lambda: init_ray(address, cfg.ray.num_cpus),
                                     prune=args.prune, specs=plans[kind]))
    except BuildError as err:
        if results:
            print(format_summary(results), flush=True)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    print(format_summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
