"""Small input builders for the model tests."""

from __future__ import annotations

import torch

from anystory.config import AnyStoryConfig
from anystory.model import Subjects


def make_subjects(config: AnyStoryConfig, valid: list[list[bool]], seed: int = 0) -> Subjects:
    g = torch.Generator().manual_seed(seed)
    b, n = len(valid), len(valid[0])
    s = config.clip_image_size
    h = config.ref_size // config.vae_scale_factor
    masks = (torch.rand(b, n, 1, h, h, generator=g) > 0.3).float()
    return Subjects(
        clip_pixels=torch.randn(b, n, 3, s, s, generator=g),
        ref_latents=torch.randn(b, n, 4, h, h, generator=g),
        ref_masks=masks,
        valid=torch.tensor(valid),
    )


def unet_inputs(config: AnyStoryConfig, batch: int, seed: int = 0, latent: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    unet = config.unet
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    size = latent * config.vae_scale_factor
    return dict(
        noisy_latents=torch.randn(batch, 4, latent, latent, generator=g),
        timesteps=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, 77, unet["cross_attention_dim"], generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
        },
    )
