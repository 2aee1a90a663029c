"""SDXL text conditioning for training, computed exactly as diffusers' SDXL pipeline computes it at
inference (both encoders' penultimate states, the second encoder's pooled embedding)."""

from __future__ import annotations

import torch

from anystory.components import BaseComponents, sdxl_pipeline


class TextEncoder:
    def __init__(self, components: BaseComponents) -> None:
        self.pipe = sdxl_pipeline(components)  # only for its encode_prompt

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings (diffusers casts them to the second encoder's)."""
        return self.pipe.text_encoder_2.dtype

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt embeds (B, 77, cross_dim), pooled (B, pooled_dim))."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled
