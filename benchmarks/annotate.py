"""Throughput of the `auto` annotator (pipelines/auto_annotator.py: GroundingDINO boxes, then SAM masks),
with random weights at the real architectures, in images/s.

Real mode (default): GroundingDINO Swin-T (the shipped GroundingDINO_SwinT_OGC config, a BERT-base
sized text encoder) and SAM ViT-H, on `--size` px images (1024: SAM's input size; GroundingDINO
resizes to 800 on the short side as in its own inference). Weights are random, so the detector's
boxes are arbitrary: each image gets up to `max_boxes_per_label` x labels boxes (9 here), and the
boxes per image are printed, since SAM's mask decoder cost follows them.
`--smoke`: the tiny configurations of pipelines/tiny_detectors.py on the CPU (what the tests run).

Settings, each timed after a warm-up call: `--batch-sizes` (images per annotator call, which is
also GroundingDINO's batch; `data.annotate.auto.batch_size`) x `--actors` (annotator instances
working at once, each with both models; with a GPU, Ray actors sharing it like the build's actor
pool with `num_gpus = 1 / actors`; one actor runs in this process).

    python benchmarks/annotate.py --device cuda [--images 64] [--batch-sizes 1,4,8] [--actors 1,2]
    python benchmarks/annotate.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from machine import describe_machine  # noqa: E402 - benchmarks/ is the script's own folder

from pipelines.auto_annotator import AutoAnnotator, build_groundingdino, build_sam  # noqa: E402
from pipelines.config import AutoAnnotateConfig  # noqa: E402
from pipelines.tiny_detectors import write_text_encoder, write_tiny_detectors  # noqa: E402

CAPTION = "a photo of a dog and a cat next to a chair"  # three noun phrases: dog, cat, chair
TARGET = "target: >= 8 images/s per H100-class GPU with both models"


def make_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour fields (not noise: JPEG-like content, as the annotator sees in a build)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC)) for _ in range(n)]


def real_config(work: Path, device: str) -> AutoAnnotateConfig:
    import groundingdino

    text_dir = work / "bert_base_random"
    write_text_encoder(text_dir)  # bert-base-uncased sizes, random weights
    shipped = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    return AutoAnnotateConfig(gdino_config=str(shipped), gdino_checkpoint="(random)", gdino_text_encoder=str(text_dir),
                              sam_model_type="vit_h", sam_checkpoint="(random)", device=device)


def build_annotator(config: AutoAnnotateConfig, smoke: bool, seed: int) -> AutoAnnotator:
    torch.manual_seed(seed)
    if smoke:
        return AutoAnnotator(config)  # the tiny models' files, through the real loading code
    return AutoAnnotator(config, models=(build_groundingdino(config), build_sam(config)))


def annotate(annotator: AutoAnnotator, images: list[np.ndarray], batch: int) -> dict[str, Any]:
    """Annotate `images` in calls of `batch`; counts of what came back and the wall time."""
    annotator.config = dataclasses.replace(annotator.config, gdino_batch_size=batch)
    counted = annotated = boxes = 0
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        out = annotator({"image": chunk, "caption": [CAPTION] * len(chunk)})
        counted += len(out["subjects"])
        annotated += sum(e is None for e in out["annotate_error"])
        boxes += sum(len(s) for s in out["subjects"])
    if annotator.device.type == "cuda":
        torch.cuda.synchronize(annotator.device)
    return {"counted": counted, "annotated": annotated, "boxes": boxes, "wall_s": time.perf_counter() - start}


def run_in_process(config: AutoAnnotateConfig, smoke: bool, images: list[np.ndarray], batches: list[int],
                   ) -> list[dict[str, Any]]:
    annotator = build_annotator(config, smoke, seed=0)
    results = []
    for batch in batches:
        annotate(annotator, images[:batch], batch)  # warm-up: kernels, allocator, lazy imports
        results.append(dict(annotate(annotator, images, batch), batch=batch, actors=1))
    return results


def run_actors(config: AutoAnnotateConfig, smoke: bool, images: list[np.ndarray], batches: list[int],
               actors: int, num_cpus: int | None) -> list[dict[str, Any]]:
    """`actors` Ray actors, each with both models, splitting the images; timed from the first call
    to the last result (the slowest actor)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    gpu = torch.device(config.device).type == "cuda"

    @ray.remote(num_gpus=1 / actors if gpu else 0, num_cpus=0 if gpu else 1)
    class Annotator:
        def __init__(self, seed: int):
            torch.set_num_threads(1 if not gpu else torch.get_num_threads())
            self.annotator = build_annotator(config, smoke, seed)

        def run(self, imgs: list[np.ndarray], batch: int) -> dict[str, Any]:
            return annotate(self.annotator, imgs, batch)

    pool = [Annotator.remote(seed) for seed in range(actors)]
    shares = [images[k::actors] for k in range(actors)]
    results = []
    for batch in batches:
        ray.get([a.run.remote(s[:batch], batch) for a, s in zip(pool, shares, strict=True)])  # warm-up
        refs = [ray.put(s) for s in shares]
        start = time.perf_counter()
        parts = ray.get([a.run.remote(r, batch) for a, r in zip(pool, refs, strict=True)])
        wall = time.perf_counter() - start
        results.append({"counted": sum(p["counted"] for p in parts), "annotated": sum(p["annotated"] for p in parts),
                        "boxes": sum(p["boxes"] for p in parts), "wall_s": wall, "batch": batch, "actors": actors})
    for a in pool:
        ray.kill(a)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (tests)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; --smoke: cpu)")
    ap.add_argument("--images", type=int, default=None, help="images per setting (default 64; --smoke: 4)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 1024; --smoke: 128)")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,8; --smoke: 2)")
    ap.add_argument("--actors", default="1", help="comma list of annotator counts (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    n_images = args.images or (4 if args.smoke else 64)
    size = args.size or (128 if args.smoke else 1024)
    batches = [int(b) for b in (args.batch_sizes or ("2" if args.smoke else "1,4,8")).split(",")]
    actor_counts = [int(a) for a in args.actors.split(",")]
    if min(batches + actor_counts + [n_images]) < 1:
        ap.error("--images, --batch-sizes and --actors must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            config = dataclasses.replace(write_tiny_detectors(Path(tmp), seed=0), device=device)
            models = "tiny GroundingDINO (Swin-T backbone, 1+1 layers, tiny BERT) + tiny SAM"
        else:
            config = real_config(Path(tmp), device)
            models = "GroundingDINO Swin-T (OGC config, BERT-base text encoder) + SAM vit_h"
        images = make_images(n_images, size)
        print(f"auto annotator benchmark: {models}, random weights, {size}x{size} images, caption {CAPTION!r}")
        print(f"machine: {describe_machine(torch.device(device))}")
        gpus = 1 if device.startswith("cuda") else 0
        print(f"{'batch':>5} {'actors':>6} {'given':>6} {'counted':>7} {'annotated':>9} {'boxes/img':>9} "
              f"{'wall_s':>8} {'images/s':>9}")
        for actors in actor_counts:
            if actors == 1:
                results = run_in_process(config, args.smoke, images, batches)
            else:
                results = run_actors(config, args.smoke, images, batches, actors, args.threads)
            for r in results:
                rate = r["counted"] / r["wall_s"]
                assert math.isfinite(rate)
                print(f"{r['batch']:>5} {r['actors']:>6} {n_images:>6} {r['counted']:>7} {r['annotated']:>9} "
                      f"{r['boxes'] / max(r['counted'], 1):>9.2f} {r['wall_s']:>8.3f} {rate:>9.3f}")
    print("images/s per GPU = images/s (one GPU shared by the actors)" if gpus else
          "images/s on the CPU: not a GPU figure")
    print(TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
