"""SDXL text conditioning for training, computed exactly as diffusers' SDXL pipeline computes it at
inference (both encoders' penultimate states, the second encoder's pooled embedding)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from anystory.components import BaseComponents


class TextEncoder:
    def __init__(self, components: BaseComponents) -> None:
        # A pipeline object only for its encode_prompt; it holds references, not copies.
        self.pipe = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=components.scheduler,
        )

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt embeds (B, 77, cross_dim), pooled (B, pooled_dim))."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled
