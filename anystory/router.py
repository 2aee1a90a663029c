"""The per-layer instance-aware router (paper Section 2.2; defaults paper.md Section 8, item 12):
a mini segmentation decoder that turns the routing features R (one per subject + background) and
the layer's latent features Z_l into routing maps over the N + 1 routes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anystory.config import RouterConfig

MASKED_LOGIT = -1e4  # finite, so bf16 and the Gumbel noise never meet an inf - inf


class Router(nn.Module):
    def __init__(self, latent_dim: int, config: RouterConfig) -> None:
        super().__init__()
        width = config.width
        self.heads = config.heads
        self.scale = width**-0.5
        # Coarse map: "Linear A" on R, "Linear B" on Z, inner product.
        self.coarse_route = nn.Linear(config.routing_dim, width)
        self.coarse_latent = nn.Linear(latent_dim, width)
        # Mask2Former-style masked cross-attention: routes query the positions the coarse map gave them.
        self.attn_k = nn.Linear(latent_dim, width)
        self.attn_v = nn.Linear(latent_dim, width)
        self.attn_q = nn.Linear(width, width)
        self.attn_out = nn.Linear(width, width)
        self.norm_attn = nn.LayerNorm(width)
        self.ffn = (
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            if config.ffn
            else None
        )
        self.norm_ffn = nn.LayerNorm(width) if config.ffn else None
        # Refined map: a second "Linear A / Linear B" pair.
        self.refined_route = nn.Linear(width, width)
        self.refined_latent = nn.Linear(latent_dim, width)

    def forward(
        self, routes: torch.Tensor, latents: torch.Tensor, route_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """routes (B, R, d_r), latents (B, hw, d), route_valid (B, R) bool
        -> (coarse, refined) logits, each (B, hw, R), padding routes at MASKED_LOGIT."""
        invalid = ~route_valid[:, None, :]
        query = self.coarse_route(routes)
        coarse = torch.einsum("bhc,brc->bhr", self.coarse_latent(latents), query) * self.scale
        coarse = coarse.masked_fill(invalid, MASKED_LOGIT)

        # Each route attends only where the coarse map picks it; a route with no position attends
        # everywhere, so that no row of the attention is empty.
        picked = F.one_hot(coarse.argmax(-1), coarse.shape[-1]).bool().transpose(1, 2)  # (B, R, hw)
        allowed = picked | ~picked.any(dim=-1, keepdim=True)
        q = rearrange(self.attn_q(query), "b r (h d) -> b h r d", h=self.heads)
        k = rearrange(self.attn_k(latents), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.attn_v(latents), "b n (h d) -> b h n d", h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        refined_query = self.norm_attn(query + self.attn_out(rearrange(attended, "b h r d -> b r (h d)")))
        if self.ffn is not None:
            refined_query = self.norm_ffn(refined_query + self.ffn(refined_query))

        refined = torch.einsum(
            "bhc,brc->bhr", self.refined_latent(latents), self.refined_route(refined_query)
        ) * self.scale
        return coarse, refined.masked_fill(invalid, MASKED_LOGIT)


def hard_routes(logits: torch.Tensor, sampling: str, tau: float = 1.0) -> torch.Tensor:
    """sigma(M): one-hot over the last axis. "gumbel": straight-through Gumbel-softmax (training,
    gradients reach the logits); "argmax": plain one-hot (inference)."""
    if sampling == "gumbel":
        return F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1).to(logits.dtype)
    if sampling == "argmax":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    raise ValueError(f"unknown routing sampling {sampling!r}; use 'gumbel' or 'argmax'")
