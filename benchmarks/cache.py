"""Training step rate with and without the encoder cache (training/cache.py), tiny preset, CPU.

1. Steps on in-memory batches: the config's stage (`training_step` + backward + AdamW) on batches the loader
   produced beforehand. Without the cache the step runs the VAE (target and references), both text
   encoders and the CLIP image encoder; with it, none of them. The two kinds alternate in `--rounds`
   rounds (the order swapped each round) and the medians are printed, so that a load that changes
   during the run (a shared machine) weighs on both alike.
2. Loader alone: samples/s of each training loader (workers as in the config), one pass each. Without
   the cache the workers decode and augment images; with it they read the cached tensors.
The cache is built once beforehand (in-process runner; its time is printed) with random tiny
weights, the same the timed module uses. Without `--shards` a toy world is generated and sharded.

    python benchmarks/cache.py [--shards DIR ...] [--config training/configs/tiny_stage1.yaml]
                               [--steps 10] [--rounds 5] [--variants 4] [--workers N] [--threads N]
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from loader import data_module, data_parser, make_shards, training_config
from machine import describe_machine

from training.cache import main as cache_main
from training.module import AnyStoryModule


def step_module(config: dict[str, Any]) -> tuple[AnyStoryModule, torch.optim.Optimizer]:
    """The config's stage module with random weights (the cache is made with the same) and no lr
    schedule (there is no Trainer here)."""
    module_path, name = config["model"]["class_path"].rsplit(".", 1)
    args = dict(config["model"]["init_args"])
    module = getattr(importlib.import_module(module_path), name)(
        **{**args, "base_dir": None, "init_from": None, "lr_decay": "constant"})
    module.configure_model()
    module.train()
    return module, module.configure_optimizers()["optimizer"]


def step(module: AnyStoryModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any], i: int) -> int:
    batch = module.on_before_batch_transfer(batch, 0)
    loss = module.training_step(batch, i)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return len(batch["caption"])


def rate_in_memory(module: AnyStoryModule, optimizer: torch.optim.Optimizer, batches: list[dict], steps: int) -> float:
    """Samples/s over `steps` steps on held batches (cycled)."""
    samples, t0 = 0, time.perf_counter()
    for i in range(steps):
        samples += step(module, optimizer, batches[i % len(batches)], i)
    return samples / (time.perf_counter() - t0)


def rate_of_loader(loader: Any, batches: int, warmup: int = 2) -> float:
    """Samples/s of the loader alone, after `warmup` batches (worker start-up not counted)."""
    samples = 0
    for i, batch in enumerate(loader):
        if i == warmup:
            t0 = time.perf_counter()
        samples += len(batch["caption"]) if i >= warmup else 0
        if i + 1 == warmup + batches:
            break
    return samples / (time.perf_counter() - t0)


def main() -> None:
    ap = data_parser(__doc__, images=96)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per kind and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are printed)")
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches")
    ap.add_argument("--variants", type=int, default=4, help="cached augmentation draws per sample")
    args = ap.parse_args()
    config = training_config(args)
    warnings.simplefilter("ignore")  # `self.log` outside a Trainer warns on every call
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        shards = args.shards or make_shards(Path(tmp), args.images)
        cache_dir = str(Path(tmp) / "encoder_cache")
        t0 = time.perf_counter()
        cache_main(["--config", args.config, "--shards", *shards, "--out", cache_dir, "--runner", "local",
                    "--variants", str(args.variants)])
        build_s = time.perf_counter() - t0
        module, optimizer = step_module(config)
        modules, batches, loader_rates = {}, {}, {}
        for name, cache in (("without", None), ("with", cache_dir)):
            run_config = {**config, "data": {**config["data"], "cache_dir": cache}}
            modules[name] = data_module(run_config, shards, args.workers, epoch_batches=args.batches + 2)
            batches[name] = [b for _, b in zip(range(4), modules[name].train_dataloader(), strict=False)]
            loader_rates[name] = rate_of_loader(modules[name].train_dataloader(), args.batches)
        for name in batches:  # untimed: first-call allocations of each path
            step(module, optimizer, batches[name][0], 0)
        rates: dict[str, list[float]] = {"without": [], "with": []}
        for r in range(args.rounds):
            for name in (("without", "with") if r % 2 == 0 else ("with", "without")):
                rates[name].append(rate_in_memory(module, optimizer, batches[name], args.steps))
    data = modules["with"]
    ratios = [on / off for on, off in zip(rates["with"], rates["without"], strict=True)]

    print(f"machine: {describe_machine(torch.device('cpu'))}; torch threads {torch.get_num_threads()}")
    print(f"config: {args.config}; batch {data.hparams.batch_size}, {data.hparams.num_workers} loader workers, "
          f"resolution {data.sample.resolution}, max_subjects {data.sample.max_subjects}")
    print(f"cache build: {build_s:.1f} s ({args.variants} variants per sample, in-process, model load included)")
    off, on = statistics.median(rates["without"]), statistics.median(rates["with"])
    print(f"stage-{module.stage} step (in-memory batches, median of {args.rounds} rounds x {args.steps} steps): "
          f"without cache {off:.1f} samples/s, with cache {on:.1f} samples/s")
    print(f"step rate with / without cache: {statistics.median(ratios):.2f}x (median of the rounds' ratios; "
          f"rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"loader alone: without cache {loader_rates['without']:.1f} samples/s, with cache "
          f"{loader_rates['with']:.1f} samples/s ({args.batches} batches)")


if __name__ == "__main__":
    main()
