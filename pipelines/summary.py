"""The one-screen summary a build ends with, and a report of published shards from their status tables.

    python -m pipelines.summary data/shards/unpaired [--reason truncated] [--limit 20]

lists, from the `NNNNNN.status.parquet` of every done shard, the inputs by status and, per rejection
reason, which inputs were rejected (with the detail the stage gave).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from pipelines.shards.status import OK, read_status

if TYPE_CHECKING:  # a type only: the summary command loads no build machinery (torch, cv2, av)
    from pipelines.build import BuildResult


def format_summary(results: list[BuildResult]) -> str:
    lines = ["", "=" * 72, "data build summary", "=" * 72]
    for r in results:
        t = r.totals()
        lines.append(f"[{r.kind}] -> {r.out}")
        lines.append(f"  shards: {r.planned} planned, {r.skipped} already done, {len(r.stats)} written this run")
        lines.append(f"  inputs: {t['inputs']}  written: {t['written']}  rejected: {sum(t['rejected'].values())}"
                     f"  samples: {t['samples']}  ({t['samples_per_s']:.1f} samples/s over {r.wall_s:.1f}s)")
        if t["rejected"]:
            lines.append("  rejected by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(t["rejected"].items())))
        if t["dropped"]:
            top = sorted(t["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))[:6]
            lines.append("  dropped (subjects / pair candidates): " + ", ".join(f"{k}={v}" for k, v in top))
        for shard, before, after, why in r.replaced:
            lines.append(f"  replaced shard {shard:06d}: {before} -> {after} samples ({why})")
        for name, why in r.removed:
            lines.append(f"  removed {name}: {why}")
        if r.cleaned:
            lines.append(f"  cleaned up: {len(r.cleaned)} temporary file(s) of a killed run")
    lines.append("=" * 72)
    return "\n".join(lines)


def format_status(rows: list[dict[str, Any]], reason: str | None = None, limit: int = 20) -> str:
    """Inputs by status, then the rejected inputs of each reason (at most `limit` per reason)."""
    counts = Counter(r["status"] for r in rows)
    lines = [f"inputs: {len(rows)}  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    for status in sorted(counts):
        if status == OK or (reason is not None and status != reason):
            continue
        rejected = [r for r in rows if r["status"] == status]
        lines.append(f"{status} ({len(rejected)}):")
        for r in rejected[:limit]:
            lines.append(f"  {r['source']}/{r['input_id']}" + (f"  ({r['detail']})" if r["detail"] else ""))
        if len(rejected) > limit:
            lines.append(f"  ... {len(rejected) - limit} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a kind's shard folder (path or fsspec URL), e.g. data/shards/unpaired")
    ap.add_argument("--reason", default=None, help="list only the inputs rejected for this reason")
    ap.add_argument("--limit", type=int, default=20, help="inputs listed per reason")
    args = ap.parse_args(argv)
    rows = read_status(args.folder)
    if not rows:
        print(f"error: {args.folder}: no done shard with a status table", file=sys.stderr)
        return 2
    print(format_status(rows, args.reason, args.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
