"""The one-screen summary a build ends with."""

from __future__ import annotations

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
        if r.removed:
            lines.append(f"  cleaned up: {len(r.removed)} leftover file(s) of an earlier run")
    lines.append("=" * 72)
    return "\n".join(lines)
