"""EMA weights of what a stage trains (`module.trainable`), kept in float32 beside the raw ones.

Lightning's `EMAWeightAveraging` averages a deep copy of the whole LightningModule, which here
would duplicate the frozen SDXL base and average it too; this callback holds only the trainable
tensors. The EMA lives in the checkpoint under `ema_state_dict` (adapter keys, as in an export),
is restored on `--ckpt_path` resume, and `python -m training.export --ema` exports it: the EMA
tensors replace the raw ones, every other adapter tensor comes from the checkpoint's state_dict.

Each optimizer step: ema = decay * ema + (1 - decay) * param; the EMA starts from the weights the
fit starts with."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

CHECKPOINT_KEY = "ema_state_dict"


class EMA(L.Callback):
    def __init__(self, decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.ema: dict[str, torch.Tensor] = {}
        self.restored: dict[str, torch.Tensor] = {}  # read from a checkpoint before the model is on its device
        self.last_step = -1

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in pl_module.trainable.items() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds shards of the trained tensors
            raise ValueError("trainer.callbacks: training.ema.EMA averages whole tensors and does not run under "
                             "FSDPStrategy (use DDPStrategy, or train without EMA)")
        params = self._trainable(pl_module)
        if self.restored:
            if set(self.restored) != set(params):
                raise KeyError(f"the checkpoint's {CHECKPOINT_KEY} does not hold this stage's trainable tensors")
            self.ema = {k: v.to(device=params[k].device, dtype=torch.float32) for k, v in self.restored.items()}
            self.restored = {}
        else:
            self.ema = {k: p.detach().float().clone() for k, p in params.items()}
        self.last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.last_step:  # gradient accumulation: no optimizer step yet
            return
        self.last_step = trainer.global_step
        params = self._trainable(pl_module)
        keys = list(self.ema)
        # One multi-tensor kernel for all tensors, as torch.optim.swa_utils' EMA does.
        torch._foreach_lerp_([self.ema[k] for k in keys], [params[k].detach().float() for k in keys],
                             1.0 - self.decay)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.ema:
            checkpoint[CHECKPOINT_KEY] = {k: v.detach().cpu() for k, v in self.ema.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # A checkpoint written without EMA: the EMA starts from its weights (on_fit_start).
        self.restored = dict(checkpoint.get(CHECKPOINT_KEY) or {})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay}
