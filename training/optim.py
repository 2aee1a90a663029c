"""The optimizer of both stages (`model.init_args.optimizer`):
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
