"""The optimizer of both stages (`model.init_args.optimizer`) and its lr schedule (`lr_schedule`):
- `adamw`: torch's AdamW, with the single-kernel (`fused`) implementation where the device has one
  and the multi-tensor (`foreach`) one elsewhere. The per-parameter loop of the default
  implementation launches several kernels per tensor: stage 1 trains about 2,000 tensors.
- `adamw8bit`: bitsandbytes' 8-bit AdamW (CUDA; an optional package, not a dependency): its moments
  take 2 bytes per parameter instead of 8, about 16 GB less for stage 1's 2.6 B parameters."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler

OPTIMIZERS = ("adamw", "adamw8bit")


class OptimizerUnavailable(ValueError):
    """The chosen optimizer's package is not installed; the one-line message names the key."""


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"model.init_args.optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}")


def check_optimizer_available(name: str) -> None:
    check_optimizer_name(name)
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise OptimizerUnavailable("model.init_args.optimizer: adamw8bit needs the bitsandbytes package, which is "
                                   "not installed (pip install bitsandbytes, on a CUDA machine)")


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    params = list(params)
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    check_optimizer_available(name)
    if name == "adamw8bit":
        bnb_optim = importlib.import_module("bitsandbytes.optim")  # imported only when chosen
        return bnb_optim.AdamW8bit(list(params), lr=lr, weight_decay=weight_decay)
    return adamw(params, lr, weight_decay, device)


LR_DECAYS = {"constant": "constant_with_warmup", "cosine": "cosine"}  # model.init_args.lr_decay -> diffusers' name


def lr_schedule(optimizer: torch.optim.Optimizer, decay: str, warmup_steps: int,
                total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule, stepped once per optimizer step: a linear warm-up from 0 over
    `warmup_steps`, then constant (the paper) or a cosine to 0 at `total_steps` (which a cosine needs:
    set trainer.max_steps; a run shorter than its warm-up never decays)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {decay!r}")
    if decay == "cosine" and total_steps <= 0:
        raise ValueError(f"lr_decay=cosine needs trainer.max_steps (> 0), got {total_steps}")
    return get_scheduler(LR_DECAYS[decay], optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps if decay == "cosine" else None)
