"""Smoke runs of the benchmark scripts on the CPU with tiny shapes: they run end to end and print
finite, positive figures. No timing assertions: the targets live in the printout only."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # One thread: on a loaded machine two OpenMP threads can wait on each other for seconds.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--threads", "1", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def finite_positive(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def test_attention_overhead_quick() -> None:
    out = run_script("attention_overhead.py", "--quick")
    rows = re.findall(r"^\s*(\d+)\s+(forward|step)\s+(\S+)\s+(\S+)\s+(\S+)x\s*$", out, flags=re.MULTILINE)
    assert sorted((int(n), kind) for n, kind, *_ in rows) == [(n, k) for n in (1, 2, 4) for k in ("forward", "step")], out
    for _, _, plain_ms, anystory_ms, ratio in rows:
        for value in (plain_ms, anystory_ms, ratio):
            finite_positive(value)
    assert "target: <= 1.25x for N = 2 at SDXL shapes" in out
    assert "computed once before the timed region" in out
    # The baseline is the same network: without a context the patched UNet computes plain attention.
    diff = re.search(r"max \|diff\| to the patched UNet without context: (\S+)\)", out)
    assert diff and float(diff.group(1)) < 1e-4, out
    counts = {name.strip(): (int(ops), int(kernels), int(syncs)) for name, ops, kernels, syncs in re.findall(
        r"^\s*(plain(?:, fused q/k/v)?|N=\d step(?:, router off)?)\s+(\d+)\s+\S+x\s+(\d+)\s+\S+x\s+(\d+)\s*$",
        out, flags=re.MULTILINE)}
    assert len(counts) == 8, out
    # No layer reads a device value back: zero host synchronisations in every routed step.
    assert all(syncs == 0 for _, _, syncs in counts.values()), counts
    # The routed overhead is per layer, not per subject: N does not change the op count.
    assert counts["N=1 step"] == counts["N=2 step"] == counts["N=4 step"], counts


def test_generate_quick() -> None:
    out = run_script("generate.py", "--quick")
    times = dict(re.findall(r"^\s*(plain|anystory N=\d)\s+(\S+)\s+\S+x\s*$", out, flags=re.MULTILINE))
    assert sorted(times) == ["anystory N=1", "anystory N=2", "anystory N=4", "plain"], out
    for value in times.values():
        finite_positive(value)
    rows = re.findall(r"^\s*(plain|anystory N=\d)\s+(\d+)\s+\S+x\s+(\d+)\s+(\d+)\s*$", out, flags=re.MULTILINE)
    counts = {name: (int(ops), int(syncs)) for name, ops, _, syncs in rows}
    assert len(counts) == 4, out
    # The sampler's own synchronisations are diffusers'; AnyStory adds none to a step.
    assert {syncs for _, syncs in counts.values()} == {counts["plain"][1]}, counts
    assert counts["anystory N=1"][0] == counts["anystory N=4"][0] > counts["plain"][0], counts


def test_gpu_sdxl_cpu_tiny() -> None:
    out = run_script("gpu_sdxl.py", "--device", "cpu", "--preset", "tiny", "--resolution", "64",
                     "--dtype", "float32", "--quick")
    ratios = dict(re.findall(r"^ratio \((a|b)\)[^:]*:\s*(\S+)x", out, flags=re.MULTILINE))
    assert sorted(ratios) == ["a", "b"], out
    for value in ratios.values():
        finite_positive(value)
    medians = re.findall(r"^\s{2}\S.*?\s(\S+) ms\s", out, flags=re.MULTILINE)
    assert len(medians) == 4, out  # (a) plain, stage 1; (b) full UNet, simplified ReferenceNet
    for ms in medians:
        finite_positive(ms)
    covered = re.search(r"(\d+) / (\d+) stage-1 parameter tensors received a gradient", out)
    assert covered and covered.group(1) == covered.group(2) and int(covered.group(2)) > 0, out
    syncs = re.search(r"host syncs per stage-1 step: (\d+)", out)
    assert syncs and int(syncs.group(1)) == 0, out  # forward, backward and AdamW never wait for the device


def test_loader_quick() -> None:
    out = run_script("loader.py", "--images", "24", "--batches", "4", "--steps", "2", "--warmup", "2")
    rates = dict(re.findall(r"^(loader|stage-1 step)\s*:\s*(\S+) samples/s", out, flags=re.MULTILINE))
    assert sorted(rates) == ["loader", "stage-1 step"], out
    ratio = re.search(r"^loader / step: (\S+)x\s+\(target >= 5x\)", out, flags=re.MULTILINE)
    assert ratio, out
    # The printed ratio is the quotient of the two printed rates.
    assert abs(finite_positive(ratio.group(1)) - finite_positive(rates["loader"]) / finite_positive(rates["stage-1 step"])) < 0.03 * finite_positive(ratio.group(1)) + 0.01, out
    assert "batch 4, 2 loader workers" in out, out
