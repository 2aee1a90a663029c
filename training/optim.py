"""The optimizer of both stages: AdamW, with the single-kernel (`fused`) implementation where the
device has one and the multi-tensor (`foreach`) one elsewhere. The per-parameter loop of the
default implementation launches several kernels per tensor: stage 1 trains about 2,000 tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    params = list(params)
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
