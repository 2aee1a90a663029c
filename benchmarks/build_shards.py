"""Data build benchmark on toyworld, measured side by side in one run (CPU only).

1. Throughput: the Ray build (local cluster, `--num-cpus` CPUs) against a single-process loop over
   the same stage functions (`runner=local`), on the same inputs; samples/s of each and their ratio.
   The Ray figure counts the whole `run_build` call on a freshly started cluster, after a 2-row
   Ray Data warm-up (the driver's one-time Ray Data imports, ~3 s here, are not build work); the
   cluster start itself is reported separately. The 4x input is timed too.
2. Memory: peak memory of the Ray build (driver + every Ray process: the sum of their PSS, sampled
   every 0.2 s) on the base input and on an input 4x larger, each on a fresh cluster; their ratio.
3. Long videos: the paired build (single process, `runner=local`) of toyworld clips with two
   scenes each, and of the same kind of clips 4x longer; time and peak-memory ratios (targets <= 4.5x,
   i.e. linear, and <= 1.5x: frames kept per scene are bounded). Peak memory is the process's PSS
   (all of it, and above what it held before the build).

    python benchmarks/build_shards.py [--images 960] [--size 384] [--per-shard 32] [--num-cpus 2]
                                      [--video-seconds 60] [--video-size 240] [--video-fps 12]
                                      [--video-clips 2] [--only images|videos]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipelines.build import run_build  # noqa: E402
from pipelines.config import ToyworldConfig, parse_data_config  # noqa: E402
from pipelines.toyworld.generate import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak of the summed PSS of this process and all its descendants (the local Ray cluster)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def sample(self) -> int:
        total = 0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def data_config(toy: Path, out: Path, per_shard: int):
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    data["sources"] = {"unpaired": [{"type": "coco", "name": "toyworld", "annotations": f"{toy}/images/annotations.json",
                                     "images": f"{toy}/images"}], "paired": []}
    data["out_dir"] = str(out)
    data["shards"]["images_per_shard"] = per_shard
    return parse_data_config(data)


def make_toyworld(root: Path, images: int, size: int) -> Path:
    toy = root / f"toy_{images}_{size}"
    generate(ToyworldConfig(out_dir=str(toy), num_images=images, image_size=size, num_videos=0, seed=11))
    return toy


def ray_build(cfg, out: Path, num_cpus: int) -> tuple[float, float, int, int]:
    """(cluster start s, build s, samples, peak bytes) on a fresh local cluster."""
    import ray

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.range(2, override_num_blocks=1).map_batches(lambda b: b).take_all()  # warm-up
        t1 = time.perf_counter()
        result = run_build(cfg, "unpaired", str(out), runner="ray")
        t2 = time.perf_counter()
        ray.shutdown()
    return t1 - t0, t2 - t1, result.totals()["samples"], mem.peak


def make_video(root: Path, seconds: float, size: int, fps: int, clips: int) -> Path:
    toy = root / f"video_{seconds:g}s"
    generate(ToyworldConfig(out_dir=str(toy), num_images=0, num_videos=clips, video_size=size, video_fps=fps,
                            video_seconds=seconds, scene_cut_fraction=1.0, seed=5))
    return toy


def video_build(toy: Path, out: Path) -> tuple[float, int, int, int, int]:
    """(build s, frames decoded, samples, peak PSS bytes, PSS before the build) of the paired build."""
    import json

    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    data["sources"] = {"unpaired": [], "paired": [{"type": "video_folder", "name": "clip", "path": f"{toy}/videos"}]}
    data["out_dir"] = str(out)
    cfg = parse_data_config(data)
    frames = sum(len(json.loads(p.read_text())["frames"]) for p in (toy / "videos").glob("*.json"))
    with PeakMemory(interval=0.05) as mem:
        before = mem.sample()
        t = time.perf_counter()
        result = run_build(cfg, "paired", str(out), runner="local")
        build_s = time.perf_counter() - t
    return build_s, frames, result.totals()["samples"], mem.peak, before


def video_report(seconds: float, size: int, fps: int, clips: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        root = Path(tmp)
        # Generated in a child process: the generator's frames must not count in this process's memory.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            base, long = pool.map(make_video, [root] * 2, [seconds, 4 * seconds], [size] * 2, [fps] * 2, [clips] * 2)
        video_build(base, root / "warm")  # imports and first-call costs are not the video's
        b_s, b_frames, b_n, b_peak, b_before = video_build(base, root / "out_base")
        l_s, l_frames, l_n, l_peak, l_before = video_build(long, root / "out_long")
    mib = 1024**2
    print()
    print(f"long videos: {clips} toyworld clips with 2 scenes each, {size}x{size} px at {fps} fps; "
          "paired build, one process")
    for name, sec, s, frames, n, peak, before in (("base", seconds, b_s, b_frames, b_n, b_peak, b_before),
                                                  ("4x  ", 4 * seconds, l_s, l_frames, l_n, l_peak, l_before)):
        print(f"{name} {sec:6.0f} s clips: {frames:5d} frames -> {n:2d} pairs in {s:6.1f}s   "
              f"peak {peak / mib:7.1f} MiB ({(peak - before) / mib:6.1f} MiB above the pre-build level)")
    print(f"time 4x / 1x        : {l_s / b_s:.2f}   (target <= 4.5)")
    print(f"peak memory 4x / 1x : {l_peak / b_peak:.2f}   (target <= 1.5; above pre-build: "
          f"{(l_peak - l_before) / max(b_peak - b_before, 1):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=960)  # base input; the memory check uses 4x this
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--per-shard", type=int, default=32)  # params.yaml's data.shards.images_per_shard
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--video-seconds", type=float, default=60.0)  # the long-video check uses 4x this
    ap.add_argument("--video-size", type=int, default=240)
    ap.add_argument("--video-fps", type=int, default=12)
    ap.add_argument("--video-clips", type=int, default=2)
    ap.add_argument("--only", choices=("images", "videos"), default=None)
    args = ap.parse_args()
    if args.only != "images":
        video_report(args.video_seconds, args.video_size, args.video_fps, args.video_clips)
    if args.only == "videos":
        return
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        base = make_toyworld(root, args.images, args.size)
        big = make_toyworld(root, 4 * args.images, args.size)
        print(f"toyworld: {args.images} and {4 * args.images} images at {args.size} px "
              f"({time.perf_counter() - t:.0f}s to generate)", flush=True)

        cfg = data_config(base, root / "out_local", args.per_shard)
        with PeakMemory() as local_mem:
            t = time.perf_counter()
            local = run_build(cfg, "unpaired", str(root / "out_local"), runner="local")
            local_s = time.perf_counter() - t
        local_n = local.totals()["samples"]
        start_s, ray_s, ray_n, ray_peak = ray_build(data_config(base, root / "out_ray", args.per_shard),
                                                    root / "out_ray", args.num_cpus)
        assert ray_n == local_n, (ray_n, local_n)
        _, big_s, big_n, big_peak = ray_build(data_config(big, root / "out_big", args.per_shard),
                                              root / "out_big", args.num_cpus)

    gib = 1024**3
    print()
    print(f"machine: {os.cpu_count()} CPUs visible; Ray local cluster with num_cpus={args.num_cpus}")
    print(f"input: {args.images} toyworld images, {args.size} px, {args.per_shard} per shard -> {local_n} samples")
    print(f"single-process loop : {local_n / local_s:8.1f} samples/s  ({local_s:.1f}s)  peak {local_mem.peak / gib:.2f} GiB")
    print(f"Ray build           : {ray_n / ray_s:8.1f} samples/s  ({ray_s:.1f}s; cluster start {start_s:.1f}s "
          f"not included)  peak {ray_peak / gib:.2f} GiB")
    print(f"speed-up            : {local_s / ray_s:.2f}x   (target >= 1.6x)")
    print(f"Ray build, 4x input : {big_n / big_s:8.1f} samples/s  ({big_s:.1f}s)  peak {big_peak / gib:.2f} GiB"
          f"   ({(big_n / big_s) / (local_n / local_s):.2f}x the single-process rate)")
    print(f"peak memory 4x / 1x : {big_peak / ray_peak:.2f}   (target <= 1.2)")


if __name__ == "__main__":
    main()
