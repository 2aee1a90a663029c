"""Seconds per generated image: AnyStoryPipeline (N subjects) against diffusers' plain SDXL pipeline
on the same weights, sampler, steps and guidance, measured side by side; plus, for one denoising
step, the aten ops and host synchronisations of each (device-independent proxies of GPU cost).

    python benchmarks/generate.py --device cuda --dtype bfloat16           # SDXL shapes, 1024 px, 25 steps
    python benchmarks/generate.py --device cuda --dtype bfloat16 --compile # + the compiled AnyStory path
    python benchmarks/generate.py --quick                                  # tiny preset on the CPU (smoke)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import numpy as np
import torch
from dispatch import DispatchCount, OpCounter
from machine import describe_machine
from PIL import Image

from anystory.components import build_random, sdxl_pipeline
from anystory.model import AnyStoryModel
from anystory.pipeline import AnyStoryPipeline
from anystory.presets import get_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "a photo of a toy and a dog on a beach"


def reference(index: int, size: int) -> tuple[Image.Image, Image.Image]:
    """A reference image and its mask: a coloured disc on grey."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    pixels = np.full((size, size, 3), 128, np.uint8)
    pixels[disc] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels), Image.fromarray((disc * 255).astype(np.uint8))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def count_step(pipe_call) -> DispatchCount:
    """Ops of the second denoising step: the pipeline's step-end callback starts the count when
    the first step (which fills the per-call caches) ends, and stops it when the second ends."""
    counter = OpCounter()
    counted: list[DispatchCount] = []

    def on_step_end(pipe, step: int, timestep, kwargs):  # diffusers' step-end callback
        if step == 0:
            counter.__enter__()
        elif step == 1:
            counter.__exit__(None, None, None)
            counted.append(counter.result())
        return kwargs

    pipe_call(on_step_end)
    return counted[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "sdxl"], default=None, help="default sdxl; tiny with --quick")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 3 with --quick)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per variant (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time AnyStoryPipeline(compile=True)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 3 steps, 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("tiny" if args.quick else "sdxl")
    steps = args.steps or (3 if args.quick else 25)
    repeats = 1 if args.quick else args.repeats
    if steps < 2 or repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]

    cfg = get_preset(args.preset)
    resolution = args.resolution or cfg.resolution
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        comp = build_random(cfg, tokenizer_dir, seed=0, device=device)
    plain_unet = copy.deepcopy(comp.unet)  # before AnyStory patches it: diffusers' own processors
    model = AnyStoryModel(cfg, comp.unet, comp.image_encoder).to(device=device, dtype=dtype).eval()
    for part in (comp.vae, comp.text_encoder, comp.text_encoder_2, plain_unet):
        part.to(device=device, dtype=dtype)
    plain = sdxl_pipeline(comp, unet=plain_unet)
    variants = {"anystory": AnyStoryPipeline(model, comp)}
    if args.compile:
        variants["anystory compiled"] = AnyStoryPipeline(model, comp, compile=True)
    common = dict(num_inference_steps=steps, guidance_scale=args.cfg, height=resolution, width=resolution)
    refs = [reference(i, 256) for i in range(max(args.subjects))]

    def run_plain(callback=None):
        return plain(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=callback,
                     **common).images

    def run_anystory(pipe: AnyStoryPipeline, n: int, callback=None):
        encoding = pipe.encode(refs[:n])  # part of the image's cost: done once per call
        return pipe.generate(PROMPT, encoding, seed=0, num_inference_steps=steps, guidance_scale=args.cfg,
                             height=resolution, width=resolution, step_callback=callback).images

    with torch.no_grad():
        runs = {"plain": run_plain}
        for name, pipe in variants.items():
            runs.update({f"{name} N={n}": (lambda p=pipe, n=n: run_anystory(p, n)) for n in args.subjects})
        for run in runs.values():  # warm-up (and compilation)
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(repeats):
            order = list(runs)[round_index % len(runs):] + list(runs)[: round_index % len(runs)]
            for name in order:
                times[name].append(seconds(runs[name], device))
        counts = {"plain": count_step(run_plain)}
        counts.update({f"anystory N={n}": count_step(lambda cb, n=n: run_anystory(variants["anystory"], n, cb))
                       for n in args.subjects})

    print("Generation: AnyStoryPipeline vs diffusers' StableDiffusionXLPipeline, same weights and sampler")
    print(f"machine: {describe_machine(device)}; dtype {str(dtype).removeprefix('torch.')}")
    print(f"preset {args.preset} (random weights), {resolution} px, {steps} Euler steps (Karras sigmas), CFG {args.cfg}, "
          f"batch 1; AnyStory time includes encoding the references; {repeats} timed image(s) per variant after a "
          "warm-up, variants interleaved")
    plain_s = statistics.median(times["plain"])
    print(f"{'variant':>24} {'s / image':>10} {'ratio':>7}")
    for name, values in times.items():
        print(f"{name:>24} {statistics.median(values):>10.3f} {statistics.median(values) / plain_s:>6.2f}x")
    print("target: <= 1.3x")
    print("one denoising step (CFG batch), counted with a TorchDispatchMode:")
    print(f"{'variant':>24} {'aten ops':>9} {'ratio':>7} {'kernels':>8} {'syncs':>6}")
    for name, count in counts.items():
        print(f"{name:>24} {count.total:>9} {count.total / counts['plain'].total:>6.2f}x {count.kernels:>8} "
              f"{count.syncs:>6}")


if __name__ == "__main__":
    main()
