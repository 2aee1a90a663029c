"""Training progress counted in optimizer steps, the unit the configs set (`max_steps`; epochs are
endless resampled streams): a bar for terminals, and plain lines for logs and pipes, where a bar
would write nothing readable."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


def total_steps(trainer: L.Trainer) -> int | None:
    """The step the run ends at: `max_steps`, else what the epochs allow; None when endless."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    estimate = trainer.estimated_stepping_batches
    return None if math.isinf(estimate) else int(estimate)


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class StepProgress(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the last step), rank zero prints one line:
    `step 40/200 (20%) | 1.25 steps/s | 5.0 samples/s | loss 0.1234 | elapsed 0:00:32 | ETA 0:02:08`.
    Rates are over the steps since the previous line (all ranks' samples); the ETA assumes that rate."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start = self._mark = 0.0
        self._mark_step = 0
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = self._mark = time.perf_counter()
        self._mark_step, self._samples = trainer.global_step, 0  # a resumed run starts at its checkpoint's step
        if trainer.is_global_zero:
            total = total_steps(trainer)
            print(f"training from step {trainer.global_step} to {total if total else 'the end of the data'}, "
                  f"a line every {self.every_n_steps} steps", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rows = batch.get("caption", batch.get("pixels")) if isinstance(batch, dict) else None  # cached: no pixels
        if rows is not None:
            self._samples += len(rows) * trainer.world_size
        step, total = trainer.global_step, total_steps(trainer)
        due = step % self.every_n_steps == 0 or step == total
        # Under gradient accumulation several batches end on one step: print it once.
        if not due or step == self._mark_step or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        rate = (step - self._mark_step) / max(now - self._mark, 1e-9)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}",
                 f"{rate:.2f} steps/s", f"{self._samples / max(now - self._mark, 1e-9):.1f} samples/s"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"elapsed {clock(now - self._start)}")
        if total:
            parts.append(f"ETA {clock((total - step) / rate)}")
        print(" | ".join(parts), flush=True)
        self._mark, self._mark_step, self._samples = now, step, 0


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps towards `max_steps` over the whole run (its
    rate and ETA are then per step), instead of batches of an epoch out of an endless number."""

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.total = total_steps(trainer)
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")
        self.train_progress_bar.unit = "step"  # the rate reads steps/s

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run, not one per epoch

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar: Tqdm = self.train_progress_bar
        if not bar.disable and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, module))
