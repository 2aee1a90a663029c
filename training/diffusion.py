"""The training noise and the loss weights of both stages: noise offset (a per-sample, per-channel
constant added to the noise, so the model learns to shift an image's mean brightness) and
min-SNR-gamma weighting (Hang et al. 2023: high-SNR timesteps, which dominate the plain loss with
easy denoising, weigh at most gamma / SNR)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def training_noise(latents: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `offset` x one normal draw per sample and channel."""
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(*latents.shape[:2], *([1] * (latents.ndim - 2)),
                                             device=latents.device, dtype=latents.dtype)
    return noise


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon prediction (SNR = alpha_bar / (1 - alpha_bar))."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"snr_gamma is defined here for epsilon prediction, not {scheduler.config.prediction_type!r}")
    snr = compute_snr(scheduler, timesteps)
    return snr.clamp(max=gamma) / snr
