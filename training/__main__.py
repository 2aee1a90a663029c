"""`python -m training fit -c training/configs/<preset>_stage<k>.yaml [--ckpt_path last]`."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from training.data.datamodule import ShardDataModule
from training.module import AnyStoryModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """With run=False, the CLI only builds the model, data module and trainer from the config (the
    Ray Train launcher fits them itself)."""
    return LightningCLI(
        AnyStoryModule,
        ShardDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
