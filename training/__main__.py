"""`python -m training fit -c training/configs/<preset>_stage<k>.yaml [--ckpt_path last]`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn

from training.data.cached import EncoderCacheError
from training.data.datamodule import NoShards, ShardDataModule, UnreadableShards
from training.data.sample import PRESET_SIZES, SampleSizeMismatch, checked_preset_sizes
from training.fsdp import FSDPConfigError
from training.loggers import ResumableWandbLogger
from training.module import AnyStoryModule, ModelArgsError, check_model_args
from training.optim import OptimizerUnavailable
from training.progress import StepProgress, StepProgressBar


class CheckpointError(ValueError):
    """The checkpoint to resume from is missing or unreadable."""


def derive_sample_sizes(config: Any, given: Any) -> None:
    """Set data.sample's image sizes from the model preset (in `config`, a parsed `fit` config, in
    place): the YAMLs leave them out, so that the data and the model cannot disagree. A size written
    anyway (in `given`, the same arguments parsed without defaults) must equal the preset's."""
    if config.data.sample is None:
        config.data.sample = type(config)()  # SampleConfig's defaults, with the sizes set below
    written = {key: given.get(f"data.sample.{key}") for key in PRESET_SIZES} if given.get("data.sample") else {}
    for key, size in checked_preset_sizes(config.model.init_args.preset, written).items():
        config.data.sample[key] = size


def resume_checkpoint(trainer: Trainer, ckpt_path: str | None) -> str | None:
    """The file a fit with this `ckpt_path` resumes from ("last" resolved as Lightning resolves it;
    None when there is none yet), checked to be a readable checkpoint before the run touches any
    file of its folder. W&B loggers are told to continue their run."""
    if ckpt_path is None:
        return None
    # Lightning's own resolution of "last"/"best"/"hpc" (private, but the one fit() itself applies).
    path = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, ckpt_path, model_provided=True,
                                                          model_connected=False)
    if path is None:
        return None  # "last" before any checkpoint exists: a fresh start, as in Lightning
    if "://" not in str(path):
        if not Path(path).is_file():
            raise CheckpointError(f"--ckpt_path {path}: no such file")
        try:  # mmap: reads the archive's index and pickles, not the tensors' bytes
            torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # any failure here means "cannot resume from it"
            raise CheckpointError(f"--ckpt_path {path}: not a readable checkpoint ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else 'no detail'}); nothing was changed") from None
    for logger in trainer.loggers:
        if isinstance(logger, ResumableWandbLogger):
            logger.continue_run()
    return str(path)


class AnyStoryCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Step-based progress unless the config brings its own bar: a bar on a terminal, printed
        lines elsewhere (a log file, a pipe) or when the bar is switched off."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(callback, ProgressBar) for callback in callbacks):
            if config.get("enable_progress_bar") is not False and sys.stdout.isatty():
                callbacks.append(StepProgressBar())
            else:
                callbacks.append(StepProgress(every_n_steps=config.get("log_every_n_steps") or 50))
                kwargs["enable_progress_bar"] = False
            kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # The same arguments without defaults: what the user wrote (a default cannot disagree with the preset).
        self.given = (parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace))
                      else parser.parse_args(args, defaults=False))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        derive_sample_sizes(config, self.given[self.subcommand] if self.subcommand else self.given)
        # Out-of-range values: one line here, not jsonargparse's traceback from inside the instantiation.
        check_model_args(config.model.init_args or {})

    def before_fit(self) -> None:
        resume_checkpoint(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """With run=False, the CLI only builds the model, data module and trainer from the config (the
    Ray Train launcher fits them itself). User mistakes found while running end with one line."""
    try:
        return AnyStoryCLI(
            AnyStoryModule,
            ShardDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except UnreadableShards as err:
        message = UnreadableShards.one_line(err)
    except (NoShards, CheckpointError, OptimizerUnavailable, SampleSizeMismatch, EncoderCacheError,
            FSDPConfigError, ModelArgsError) as err:
        message = str(err)
    print(f"python -m training: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
