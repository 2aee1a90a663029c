"""Ray Train launch: `python -m training.ray_train --workers 16 --gpus -- -c CONFIG [overrides]`.

Each Ray worker builds the same LightningCLI objects from the config (without running them), with
Ray's DDP strategy and cluster environment, and fits; Ray places the workers on the cluster."""

from __future__ import annotations

import argparse
import os
from typing import Any

import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer


def _train(config: dict[str, Any]) -> None:
    import os

    from ray.train.lightning import prepare_trainer

    from training.__main__ import main, resume_checkpoint

    # Relative paths of the config (shards, run folders) mean the launcher's folder, as with torchrun;
    # on a cluster that folder must exist on every node (a shared filesystem).
    os.chdir(config["cwd"])
    # Class paths in dict form: a bare string would be taken as a strategy *name*. Constant buffers
    # are not broadcast (no collective in validation, whose batches may differ between ranks).
    args = [
        *config["cli_args"],
        '--trainer.strategy={"class_path": "ray.train.lightning.RayDDPStrategy",'
        ' "init_args": {"forward_sync_buffers": false}}',
        '--trainer.plugins=[{"class_path": "ray.train.lightning.RayLightningEnvironment"}]',
        "--trainer.devices=auto",
    ]
    cli = main(args, run=False)
    trainer = prepare_trainer(cli.trainer)
    # As `python -m training fit`: the checkpoint checked before anything is written, W&B continued.
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume_checkpoint(trainer, config["ckpt_path"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="training processes (one per GPU with --gpus)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint (or 'last')")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="-- then the `python -m training fit` arguments")
    args = parser.parse_args(argv)
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    ray.init(address=args.address, num_cpus=args.num_cpus if args.address is None else None)
    trainer = TorchTrainer(
        _train,
        train_loop_config={"cli_args": cli_args, "ckpt_path": args.ckpt_path, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpus,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
