"""Perceiver-resampler QFormer (Eq. 2): learned queries attend to [CLIP tokens ; queries].

Used twice: the subject QFormer (64 queries -> subject tokens E_i in the UNet's cross-attention
width) and the routing QFormer (1 query -> routing feature R_i)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anystory.config import QFormerConfig


class _PerceiverLayer(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, width * ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(width * ff_mult, width, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, normed = self.norm_media(media), self.norm_latents(latents)
        q = rearrange(self.to_q(normed), "b n (h d) -> b h n d", h=self.heads)
        k, v = self.to_kv(torch.cat([media, normed], dim=1)).chunk(2, dim=-1)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (k, v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        latents = latents + self.to_out(out)
        return latents + self.ff(latents)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, config.width) / config.width**0.5)
        self.proj_in = nn.Linear(config.input_dim, config.width)
        self.layers = nn.ModuleList(
            _PerceiverLayer(config.width, config.heads, config.head_dim, config.ff_mult)
            for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(config.width, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, input_dim) penultimate CLIP tokens -> (B, num_queries, output_dim)."""
        media = self.proj_in(clip_tokens)
        latents = self.queries.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm_out(self.proj_out(latents))
