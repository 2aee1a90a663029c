"""The per-layer instance-aware router (paper Section 2.2; defaults paper.md Section 8, item 12):
a mini segmentation decoder that turns the routing features R (one per subject + background) and
the layer's latent features Z_l into routing maps over the N + 1 routes.

The equations, with q_r = A(R_r) the route queries and Z the latents (hw, d):
  coarse_r(u)  = <B(Z_u), q_r> / sqrt(w)
  a_r          = MaskedAttention(query attn_q(q_r); keys attn_k(Z), values attn_v(Z); positions the
                 coarse argmax gives to r, or all positions when it gives r none)
  x_r          = LN(q_r + attn_out(a_r));  x_r = LN(x_r + FFN(x_r))
  refined_r(u) = <B'(Z_u), A'(x_r)> / sqrt(w)
They are computed with the per-route factors moved onto the weights, because the routes are few
(N + 1) and the positions many: <W Z_u + b, q> = Z_u . (W^T q) + b . q, so the latents are never
projected to the router's width; the masked attention's key projection moves onto its queries and
its value and output projections onto its output (a softmax row sums to 1, so value biases pass
through). `prepare` computes what depends only on the routes (once per call: the routing features
do not change between denoising steps), `forward` the rest, in a few batched matmuls per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anystory.config import RouterConfig

MASKED_LOGIT = -1e4  # finite, so bf16 and the Gumbel noise never meet an inf - inf


@dataclass
class RouterPlan:
    """The router's per-call factors (b samples, R routes, C latent width, w router width, h heads)."""

    coarse_weight: torch.Tensor  # (b, C, R): B^T q_r / sqrt(w)
    coarse_bias: torch.Tensor  # (b, 1, R): b_B . q_r / sqrt(w), MASKED_LOGIT added for padding routes
    attn_query: torch.Tensor  # (b, R * h, C): per head, the query through the key projection / sqrt(d)
    out_weight: torch.Tensor  # (h * C, w): value projection then output projection, per head
    out_bias: torch.Tensor  # (w,)
    query: torch.Tensor  # (b * R, w): q_r, the residual of the refinement
    route_bias: torch.Tensor | None  # (b, 1, R): 0 or MASKED_LOGIT for padding routes; None: all valid
    route_ids: torch.Tensor  # (1, R, 1): 0..R-1
    ffn: tuple[torch.Tensor, ...] | None  # (W1^T, b1, W2^T, b2) of the refinement's FFN
    refined_route: tuple[torch.Tensor, torch.Tensor]  # (W^T, b) of A'
    refined_latent: tuple[torch.Tensor, torch.Tensor]  # (W, b) of B', both / sqrt(w)


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

    def prepare(self, routes: torch.Tensor, route_valid: torch.Tensor | None) -> RouterPlan:
        """routes (b, R, d_r); route_valid (b, R) bool, or None when every route is valid."""
        b, r, _ = routes.shape
        width, heads = self.attn_q.out_features, self.heads
        head_dim = width // heads
        query = self.coarse_route(routes)  # (b, R, w)
        route_bias = None
        if route_valid is not None:
            route_bias = routes.new_zeros(b, 1, r).masked_fill(~route_valid[:, None, :], MASKED_LOGIT)
        coarse_weight = torch.einsum("wc,brw->bcr", self.coarse_latent.weight, query) * self.scale
        coarse_bias = (query @ self.coarse_latent.bias)[:, None, :] * self.scale
        if route_bias is not None:
            coarse_bias = coarse_bias + route_bias
        # Keys: <W_k Z + b_k, q_h> per head = Z . (W_k,h^T q_h) + const; the const cancels in the softmax.
        attn_q = self.attn_q(query).unflatten(-1, (heads, head_dim))  # (b, R, h, d)
        attn_query = torch.einsum("brhd,hdc->brhc", attn_q, self.attn_k.weight.unflatten(0, (heads, head_dim)))
        attn_query = attn_query.flatten(1, 2) * head_dim**-0.5
        # Values and output: attn_out(concat_h P_h (Z W_v,h^T + b_v,h)) = sum_h (P_h Z) M_h + out_bias.
        value = self.attn_v.weight.unflatten(0, (heads, head_dim)).transpose(1, 2)  # (h, C, d)
        out = self.attn_out.weight.t().unflatten(0, (heads, head_dim))  # (h, d, w)
        out_weight = torch.bmm(value, out).flatten(0, 1)  # (h * C, w)
        out_bias = F.linear(self.attn_v.bias, self.attn_out.weight, self.attn_out.bias)
        # The key bias shifts a whole softmax row, so its true gradient is 0; it stays in the graph
        # (with that exact 0) so that DDP sees every router parameter used, as before the folding.
        out_bias = out_bias + 0.0 * self.attn_k.bias.sum()
        ffn = None
        if self.ffn is not None:
            ffn = (self.ffn[0].weight.t(), self.ffn[0].bias, self.ffn[2].weight.t(), self.ffn[2].bias)
        return RouterPlan(coarse_weight, coarse_bias, attn_query, out_weight, out_bias, query.flatten(0, 1),
                          route_bias, torch.arange(r, device=routes.device)[None, :, None], ffn,
                          (self.refined_route.weight.t(), self.refined_route.bias),
                          (self.refined_latent.weight * self.scale, self.refined_latent.bias * self.scale))

    def forward(self, plan: RouterPlan, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (b, hw, C) -> (coarse, refined) logits, each (b, hw, R), padding routes at about
        MASKED_LOGIT."""
        b, n, channels = latents.shape
        routes = plan.route_ids.shape[1]
        coarse = torch.baddbmm(plan.coarse_bias, latents, plan.coarse_weight)
        # Each route attends only where the coarse map picks it; a route with no position attends
        # everywhere, so that no row of the attention is empty.
        picked = coarse.argmax(-1)[:, None, :] == plan.route_ids  # (b, R, hw)
        blocked = picked.logical_not() & picked.any(-1, keepdim=True)
        scores = torch.bmm(plan.attn_query, latents.transpose(1, 2)).unflatten(1, (routes, -1))
        weights = scores.masked_fill(blocked[:, :, None], float("-inf")).softmax(-1)  # (b, R, h, hw)
        pooled = torch.bmm(weights.flatten(1, 2), latents)  # (b, R * h, C)
        attended = torch.addmm(plan.out_bias, pooled.view(b * routes, -1), plan.out_weight)
        x = F.layer_norm(plan.query + attended, attended.shape[-1:], self.norm_attn.weight, self.norm_attn.bias,
                         self.norm_attn.eps)
        if plan.ffn is not None:
            w1, b1, w2, b2 = plan.ffn
            x = F.layer_norm(x + torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1)), w2), x.shape[-1:],
                             self.norm_ffn.weight, self.norm_ffn.bias, self.norm_ffn.eps)
        refined_query = torch.addmm(plan.refined_route[1], x, plan.refined_route[0])  # (b * R, w)
        latent_weight, latent_bias = plan.refined_latent
        refined_weight = (refined_query @ latent_weight).view(b, routes, channels)
        refined_bias = (refined_query @ latent_bias).view(b, 1, routes)
        if plan.route_bias is not None:
            refined_bias = refined_bias + plan.route_bias
        refined = torch.baddbmm(refined_bias, latents, refined_weight.transpose(1, 2))
        return coarse, refined


def hard_routes(logits: torch.Tensor, sampling: str, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sigma(M) -> (route index (B, hw), gate). "gumbel": a straight-through Gumbel-softmax one-hot
    gate (training, gradients reach the logits); "argmax": the plain argmax and no gate (inference:
    the layers gate with the index)."""
    if sampling == "gumbel":
        gate = F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1).to(logits.dtype)
        return gate.argmax(-1), gate
    if sampling == "argmax":
        return logits.argmax(-1), None
    raise ValueError(f"unknown routing sampling {sampling!r}; use 'gumbel' or 'argmax'")
