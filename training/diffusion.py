"""The diffusion training step of every model trained here (the toy base's UNet, both AnyStory
stages): noise the latents at random timesteps, predict the noise, take the (weighted) MSE.
Noise offset adds a per-sample, per-channel constant to the noise, so the model learns to shift an
image's mean brightness; min-SNR-gamma weighting (Hang et al. 2023) makes high-SNR timesteps, which
dominate the plain loss with easy denoising, weigh at most gamma / SNR. Debiased estimation (Yu et al.
2023, kohya's `--debiased_estimation_loss`) weighs each sample by 1 / sqrt(SNR): the plain epsilon loss
sees an error in the predicted image x SNR, so at high noise (SNR 0.04 at t = 800 on SDXL's schedule) a
wrong colour costs almost nothing; these weights make it cost sqrt(SNR) instead. The two multiply."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

Extra = TypeVar("Extra")


def training_noise(latents: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `offset` x one normal draw per sample and channel."""
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(*latents.shape[:2], *([1] * (latents.ndim - 2)),
                                             device=latents.device, dtype=latents.dtype)
    return noise


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float | None = None,
                 debiased: bool = False) -> torch.Tensor | None:
    """Per-sample loss weights for epsilon prediction from one SNR lookup (SNR = alpha_bar / (1 - alpha_bar)):
    min(SNR, gamma) / SNR with `snr_gamma`, times 1 / sqrt(SNR) with `debiased` (SNR capped at 1000 as
    kohya does, so the weight of t = 0 stays finite on schedules whose first SNR is larger). None when
    neither is set: the plain loss."""
    if snr_gamma is None and not debiased:
        return None
    if scheduler.config.prediction_type != "epsilon":
        option = "snr_gamma" if snr_gamma is not None else "debiased_estimation"
        raise ValueError(f"{option} is defined here for epsilon prediction, not {scheduler.config.prediction_type!r}")
    snr = compute_snr(scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma) / snr if snr_gamma is not None else torch.ones_like(snr)
    return weights * snr.clamp(max=1000.0).rsqrt() if debiased else weights


def diffusion_loss(noise_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error (in float32); with per-sample `weights`, the mean of each sample's error x its weight."""
    if weights is None:
        return F.mse_loss(noise_pred.float(), noise.float())
    per_sample = F.mse_loss(noise_pred.float(), noise.float(), reduction="none").mean(dim=tuple(range(1, noise.ndim)))
    return (per_sample * weights).mean()


def diffusion_step(scheduler: DDPMScheduler, latents: torch.Tensor,
                   predict: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Extra]],
                   noise_offset: float = 0.0, snr_gamma: float | None = None,
                   timesteps_range: tuple[int, int | None] = (0, None),
                   debiased: bool = False) -> tuple[torch.Tensor, Extra]:
    """The loss of one training step on clean `latents`. `predict(noisy, timesteps)` returns the noise
    prediction and anything else its caller needs back (stage 2: the routing maps), returned beside the loss.
    Timesteps are drawn uniformly from `timesteps_range` [min, max) (max None: the schedule's end)."""
    noise = training_noise(latents, noise_offset)
    low, high = timesteps_range
    high = scheduler.config.num_train_timesteps if high is None else high
    timesteps = torch.randint(low, high, (latents.shape[0],), device=latents.device)
    noise_pred, extra = predict(scheduler.add_noise(latents, noise, timesteps), timesteps)
    return diffusion_loss(noise_pred, noise, loss_weights(scheduler, timesteps, snr_gamma, debiased)), extra
