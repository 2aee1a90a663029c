"""Running the real training entry points as subprocesses, the way users run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"


def fit_args(shards: dict[str, Path], stage: int = 1, max_steps: int = 3, extra: list[str] | None = None) -> list[str]:
    """Arguments of `python -m training` for a few CPU steps; it writes under ./runs/tiny_stage{k}."""
    args = [
        "fit", "-c", str(CONFIGS / f"tiny_stage{stage}.yaml"),
        f"--data.train_shards=[{shards['train']}]", f"--data.val_shards=[{shards['val']}]",
        "--data.batch_size=2", "--data.num_workers=1", "--data.batches_per_epoch=2", "--data.shuffle_buffer=4",
        "--model.init_args.val_timesteps=[500]",
        f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
    ]
    return args + (extra or [])


class PauseEachStep(L.Callback):
    """Slows a run down so that a test can kill it mid-way whatever the machine's speed."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


def env() -> dict[str, str]:
    # A test that used W&B in this process left WANDB_SERVICE pointing at its wandb-core service;
    # a child inheriting it would share that service (and a killed child's run would stay open
    # there), unlike a user's fresh process. Each child starts its own, as on the command line.
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**inherited, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "WANDB_SILENT": "true"}


def run(args: list[str], cwd: Path, timeout: int = 600, module: str = "training") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(args: list[str], cwd: Path, port: int, timeout: int = 600) -> str:
    """`python -m training` under torchrun, two processes on this machine; returns the log of both
    ranks, or fails the test with its tail. A hung rank ends the whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", f"--master-port={port}",
           "-m", "training", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # not only torchrun: its ranks too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed:\n{log[-5000:]}")
    return log
