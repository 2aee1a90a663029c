"""Data loader against training step, measured side by side in one run (CPU).

1. Loader: samples/s of `ShardDataModule.train_dataloader()` with the data settings of the stage-1
   config (workers, batch size, shuffle buffer, decode + augmentation), timed after the first
   batches (worker start-up is reported, not counted).
2. Step: samples/s of tiny stage-1 training steps (`Stage1Module.training_step`: VAE and text
   encoding, reference encoding, UNet + ReferenceNet forward and backward, AdamW step) on batches
   that the loader produced beforehand and that are held in memory, so no loading is timed.

The loader must be well ahead of the step (target: at least 5x) for training not to wait on data.
Without `--shards` the toy world is generated and sharded (single process) in a temporary folder.

    python benchmarks/loader.py [--shards DIR ...] [--config training/configs/tiny_stage1.yaml]
                                [--batches 60] [--steps 20] [--workers N] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from machine import describe_machine

from training.cache import preset_sample_config
from training.data.datamodule import ShardDataModule

REPO = Path(__file__).resolve().parents[1]


def make_shards(root: Path, images: int, size: int = 128, per_shard: int = 32) -> list[str]:
    """Toy-world images sharded by the local (single-process) runner, as the build benchmark makes them."""
    from build_shards import data_config, make_toyworld, run_build

    out = root / "shards"
    run_build(data_config(make_toyworld(root, images, size), out, per_shard), "unpaired", str(out), runner="local")
    return [str(out / "unpaired")]


def data_module(config: dict[str, Any], shards: list[str], workers: int | None, epoch_batches: int) -> ShardDataModule:
    data = dict(config["data"])
    # The image sizes come from the model preset, as in the training CLI.
    sample = preset_sample_config(data.pop("sample", None) or {}, config["model"]["init_args"].get("preset", "tiny"))
    data.update(train_shards=shards, val_shards=None, batches_per_epoch=epoch_batches)
    if workers is not None:
        data["num_workers"] = workers
    return ShardDataModule(sample=sample, **data)


def time_loader(module: ShardDataModule, warmup: int, batches: int) -> tuple[float, float, list[dict]]:
    """(start-up s, samples/s, the first batches) over one pass of the training loader."""
    loader = module.train_dataloader()
    kept: list[dict] = []
    samples = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if i < warmup:
            kept.append(batch)
            if i == warmup - 1:
                t1 = time.perf_counter()
            continue
        samples += batch["pixels"].shape[0]
        if i + 1 == warmup + batches:
            break
    t2 = time.perf_counter()
    return t1 - t0, samples / (t2 - t1), kept


def time_steps(config: dict[str, Any], batches: list[dict], warmup: int, steps: int) -> float:
    """Samples/s of stage-1 optimisation steps on in-memory batches (cycled)."""
    from training.module import Stage1Module

    args = dict(config["model"]["init_args"])
    # Random weights (the step costs the same) and no lr schedule: there is no Trainer here.
    module = Stage1Module(**{**args, "base_dir": None, "init_from": None, "lr_decay": "constant"})
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    samples = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer warns on every call
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            batch = batches[i % len(batches)]
            loss = module.training_step(batch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                samples += batch["pixels"].shape[0]
    return samples / (time.perf_counter() - t0)


def data_parser(doc: str, images: int) -> argparse.ArgumentParser:
    """The options of the data benchmarks (this one, cache.py): shards or a toy world, the training
    config, loader workers, torch threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", nargs="*", help="shard folders (default: a generated toy world)")
    ap.add_argument("--images", type=int, default=images, help="toy-world images when --shards is not given")
    ap.add_argument("--config", default=str(REPO / "training/configs/tiny_stage1.yaml"))
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    return ap


def training_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config `--config` names; sets `--threads` first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return yaml.safe_load(Path(args.config).read_text())


def main() -> None:
    ap = data_parser(__doc__, images=256)
    ap.add_argument("--batches", type=int, default=60, help="timed loader batches")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed loader batches (>= 1); they feed the steps")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1: the timed steps run on the warm-up batches")
    config = training_config(args)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards or make_shards(Path(tmp), args.images)
        module = data_module(config, shards, args.workers, epoch_batches=args.warmup + args.batches)
        start_s, loader_rate, kept = time_loader(module, args.warmup, args.batches)
        step_rate = time_steps(config, kept, min(2, args.steps), args.steps)

    batch = module.hparams.batch_size
    print(f"machine: {describe_machine(torch.device('cpu'))}")
    print(f"config: {args.config}; batch {batch}, {module.hparams.num_workers} loader workers, "
          f"resolution {module.sample.resolution}, max_subjects {module.sample.max_subjects}")
    print(f"loader      : {loader_rate:8.1f} samples/s  ({args.batches} batches; worker start-up {start_s:.1f}s "
          f"not included)")
    print(f"stage-1 step: {step_rate:8.1f} samples/s  ({args.steps} steps on in-memory batches)")
    print(f"loader / step: {loader_rate / step_rate:.2f}x   (target >= 5x)")


if __name__ == "__main__":
    main()
