"""Step-based progress on a real Trainer with a one-layer module: endless epochs of 2 batches,
6 optimizer steps (the way the stage configs run: max_steps, max_epochs -1)."""

from __future__ import annotations

import re

import lightning as L
import torch

from training.progress import StepProgress, StepProgressBar


class _Line(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch["pixels"]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks: list[L.Callback], accumulate: int = 1, bar: bool = False) -> None:
    batches = [{"pixels": torch.ones(3, 2) * i} for i in range(2)]  # 3 samples a batch
    trainer = L.Trainer(accelerator="cpu", max_steps=6, max_epochs=-1, accumulate_grad_batches=accumulate,
                        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=bar, log_every_n_steps=1)
    trainer.fit(_Line(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def test_lines_count_optimizer_steps_to_max_steps(capsys):
    _fit([StepProgress(every_n_steps=2)], accumulate=2)  # 12 batches, 6 steps: a line at steps 2, 4, 6
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "training from step 0 to 6, a line every 2 steps"
    steps = [re.match(r"step (\d+)/6 \((\d+)%\) \| ", line) for line in out[1:]]
    assert all(steps) and [(m.group(1), m.group(2)) for m in steps] == [("2", "33"), ("4", "67"), ("6", "100")]
    # Each line covers 2 steps of 2 batches of 3 samples: the sample rate is 6 times the step rate.
    for line in out[1:]:
        steps_per_s, samples_per_s = (float(x) for x in re.findall(r"([\d.]+) (?:steps|samples)/s", line))
        assert abs(samples_per_s - 6 * steps_per_s) <= 0.05 * samples_per_s + 0.1
        assert re.search(r"\| loss \d+\.\d{4} \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$", line)


def test_bar_counts_steps_of_the_run_not_batches_of_an_epoch(capsys):
    _fit([StepProgressBar()], bar=True)
    out = capsys.readouterr().out
    final = out.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("train") and "6/6" in final and "step/s" in final, final
    assert "Epoch" not in out and "/-2" not in out
