"""A batch of the data module -> what the routed UNet is conditioned on, computed once per batch:
target latents, SDXL text conditioning, and the subjects. Shared by training, validation and the
evaluation script, so that all three condition the model the same way. A batch read from the
encoder cache (training/data/cached.py) brings the encoders' outputs: each such field skips its encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from anystory.model import Subjects
from anystory.preprocess import encode_subjects
from training.text import TextEncoder


@dataclass
class Conditions:
    latents: torch.Tensor  # scaled VAE latents of the targets
    embeds: torch.Tensor  # (B, 77, cross_dim) text embeddings
    added: dict[str, torch.Tensor]  # SDXL added conditions: pooled text, time ids
    subjects: Subjects


@torch.no_grad()
def encode_conditions(vae: AutoencoderKL, text: TextEncoder, batch: dict[str, Any], device: torch.device,
                      sample_latents: bool) -> Conditions:
    """`sample_latents`: draw from the VAE posterior (training) or take its mean (reproducible
    validation and evaluation)."""
    if "latent_params" in batch:  # the posterior's mean and log-variance: training still samples from it
        posterior = DiagonalGaussianDistribution(batch["latent_params"].to(device, vae.dtype))
    else:
        posterior = vae.encode(batch["pixels"].to(vae.dtype)).latent_dist
    latents = (posterior.sample() if sample_latents else posterior.mean) * vae.config.scaling_factor
    # The CPU VAE's output is channels-last, and randn_like draws in memory order: in one layout a seed
    # gives the same noise whether the latents come from the VAE or from the encoder cache.
    latents = latents.contiguous()
    if "text_embeds" in batch:
        embeds, pooled = batch["text_embeds"].to(device, text.dtype), batch["text_pooled"].to(device, text.dtype)
    else:
        embeds, pooled = text(batch["caption"], device)
    if "clip_tokens" in batch:
        subjects = Subjects(clip_pixels=None, ref_latents=batch["ref_latents"].to(device, vae.dtype),
                            ref_masks=batch["ref_latent_masks"].to(device, vae.dtype), valid=batch["valid"].bool(),
                            drop=batch.get("drop"), all_valid=batch.get("all_valid"),
                            clip_tokens=batch["clip_tokens"].to(device, vae.dtype),
                            null_clip_tokens=batch["null_clip_tokens"][0].to(device, vae.dtype))
    else:
        subjects = encode_subjects(vae, batch["clip_pixels"], batch["ref_pixels"], batch["ref_masks"], batch["valid"],
                                   batch.get("drop"), batch.get("all_valid"))
    return Conditions(latents, embeds, {"text_embeds": pooled, "time_ids": batch["time_ids"].to(pooled.dtype)},
                      subjects)


def seeded_noise(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise like `latents`, the same for a seed on any device."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype)
