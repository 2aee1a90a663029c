"""diffusers attention processors for the two routed injection paths. Each holds only its new
projections (and, for cross-attention, the layer's router) and reuses the frozen layer's
to_q / to_k / to_v / to_out. Per-call state arrives as `anystory=RoutingContext` through
`cross_attention_kwargs`; without it a processor is the plain attention of the layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn

from anystory.config import RouterConfig
from anystory.context import LayerRouting, RoutingContext
from anystory.layers import layer_hw
from anystory.router import MASKED_LOGIT, Router, hard_routes


def _copy_linear(source: nn.Linear, in_features: int | None = None) -> nn.Linear:
    """A trainable copy of a frozen projection (the IP-Adapter initialisation)."""
    # Trainable, so float32 whatever the frozen layer's dtype (bf16 master weights lose the updates).
    layer = nn.Linear(in_features or source.in_features, source.out_features, bias=source.bias is not None)
    layer.to(device=source.weight.device)
    with torch.no_grad():
        layer.weight.copy_(source.weight)
        if source.bias is not None:
            layer.bias.copy_(source.bias)
    return layer


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "... n (h d) -> ... h n d", h=heads)


def output_projection(attn: Attention, heads_out: torch.Tensor) -> torch.Tensor:
    """(B, heads, n, d) attention output -> the layer's to_out (linear, dropout)."""
    return attn.to_out[1](attn.to_out[0](rearrange(heads_out, "b h n d -> b n (h d)")))


def self_attention(attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's own self-attention, as diffusers computes it for SDXL blocks."""
    q, k, v = (split_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    return output_projection(attn, F.scaled_dot_product_attention(q, k, v))


def _check_plain(attn: Attention, hidden_states: torch.Tensor) -> None:
    # SDXL's transformer blocks use none of these; refuse rather than silently ignore them.
    if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
        raise NotImplementedError("AnyStory processors expect SDXL-style (B, tokens, dim) attention")
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        raise NotImplementedError("AnyStory processors expect no residual / rescale in the attention layer")


class RoutedCrossAttnProcessor(nn.Module):
    """Eq. 5: text attention + eta * sum_i sigma(M_l^i) * Softmax(Q K_i^T / sqrt(d)) V_i over the
    N + 1 routes (route N + 1 = background, fed the zero-image tokens)."""

    def __init__(self, attn: Attention, layer_index: int, router_config: RouterConfig) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.to_k = _copy_linear(attn.to_k)
        self.to_v = _copy_linear(attn.to_v)
        self.router = Router(attn.to_q.in_features, router_config).to(device=attn.to_q.weight.device)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        anystory: RoutingContext | None = None,
    ) -> torch.Tensor:
        _check_plain(attn, hidden_states)
        if attention_mask is not None:
            raise NotImplementedError("text attention masks are not used by SDXL")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k = split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        v = split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        if anystory is not None:
            gate = self._gate(anystory, hidden_states)  # (B, hw, R)
            if anystory.subject_attention and anystory.eta != 0.0:
                out = out + anystory.eta * self._subject_attention(attn, q, anystory, gate)
        return output_projection(attn, out)

    def _gate(self, ctx: RoutingContext, hidden_states: torch.Tensor) -> torch.Tensor:
        refs = ctx.refs
        route_valid = refs.route_valid
        if not ctx.router:
            # Stage 1 / router off: every valid subject everywhere, no background route.
            gate = route_valid.clone()
            gate[:, -1] = False
            return gate[:, None, :].to(hidden_states.dtype)
        hw = layer_hw(hidden_states.shape[1], ctx.latent_hw)
        if ctx.given_routes is not None:
            given = ctx.given_routes(hw).to(hidden_states.dtype)
            ctx.maps[self.layer_index] = LayerRouting(hw=hw, probs=given.float(), hard=given, coarse=given.float())
            return given
        coarse, refined = self.router(refs.routing_features, hidden_states, route_valid)
        hard = hard_routes(refined, ctx.sampling, ctx.tau)
        ctx.maps[self.layer_index] = LayerRouting(
            hw=hw,
            probs=refined.float().softmax(-1),
            hard=hard,
            coarse=coarse.float().softmax(-1),
        )
        return hard

    def _subject_attention(
        self, attn: Attention, q: torch.Tensor, ctx: RoutingContext, gate: torch.Tensor
    ) -> torch.Tensor:
        tokens = ctx.refs.subject_tokens  # (B, R, T, C)
        routes = tokens.shape[1]
        # One softmax per route: fold the routes into the batch of a single SDPA call.
        k, v = ctx.reference_kv(f"{self.layer_index}.subject", lambda: tuple(
            rearrange(split_heads(proj(tokens), attn.heads), "b r h t d -> (b r) h t d") for proj in (self.to_k, self.to_v)
        ))
        q_routes = rearrange(q.unsqueeze(1).expand(-1, routes, -1, -1, -1), "b r h n d -> (b r) h n d")
        per_route = rearrange(
            F.scaled_dot_product_attention(q_routes, k, v), "(b r) h n d -> b r h n d", r=routes
        )
        return torch.einsum("brhnd,bnr->bhnd", per_route, gate.to(per_route.dtype))


class RoutedReferenceAttnProcessor(nn.Module):
    """Eqs. 6-8: one softmax over [own tokens, reference tokens of all subjects]; position u sees
    subject i's reference tokens only if the previous layer routed u to i (bias 0, else a large
    negative), plus gamma. Without a router every position sees every valid reference."""

    def __init__(self, attn: Attention, layer_index: int, block_name: str) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.block_name = block_name
        # Block 1 has no preceding routing map, so G_1 is unused and it gets no new projections.
        self.uses_reference = layer_index > 0
        if self.uses_reference:
            self.to_k = _copy_linear(attn.to_k)
            self.to_v = _copy_linear(attn.to_v)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        anystory: RoutingContext | None = None,
    ) -> torch.Tensor:
        _check_plain(attn, hidden_states)
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError("SDXL self-attention takes no mask and no encoder states")
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k = split_heads(attn.to_k(hidden_states), attn.heads)
        v = split_heads(attn.to_v(hidden_states), attn.heads)
        bias = None
        if anystory is not None and anystory.reference_attention and self.uses_reference:
            features = anystory.refs.bank[self.block_name]  # (B, N, m, d)
            ref_k, ref_v = anystory.reference_kv(f"{self.layer_index}.reference", lambda: tuple(
                split_heads(rearrange(proj(features), "b s m c -> b (s m) c"), attn.heads) for proj in (self.to_k, self.to_v)
            ))
            k, v = torch.cat([k, ref_k], dim=2), torch.cat([v, ref_v], dim=2)
            bias = self._bias(anystory, hidden_states, features.shape[2])
        return output_projection(attn, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))

    def _bias(self, ctx: RoutingContext, hidden_states: torch.Tensor, ref_tokens: int) -> torch.Tensor | None:
        """Additive attention bias (B, 1, hw or 1, hw + N * m) of Eq. 7."""
        refs = ctx.refs
        tokens = hidden_states.shape[1]
        if not ctx.router and ctx.gamma == 0.0 and bool(refs.valid.all()):
            return None  # every position sees every reference: no bias needed
        if ctx.router:
            allowed = self._previous_routes(ctx, tokens)  # (B, hw, N)
        else:
            allowed = refs.valid[:, None, :]  # (B, 1, N): rows do not depend on the position
        subject_bias = torch.where(allowed, ctx.gamma, MASKED_LOGIT).to(hidden_states.dtype)
        subject_bias = subject_bias.repeat_interleave(ref_tokens, dim=-1)
        own = subject_bias.new_zeros(*subject_bias.shape[:2], tokens)
        return torch.cat([own, subject_bias], dim=-1)[:, None]

    def _previous_routes(self, ctx: RoutingContext, tokens: int) -> torch.Tensor:
        """sigma(M_{l-1}^i) at this layer's size, detached (paper.md Section 8, item 20); at a
        resolution change the probabilities are resized bilinearly and re-argmaxed (item 19)."""
        previous = ctx.maps.get(self.layer_index - 1)
        if previous is None:
            raise RuntimeError(
                f"{self.block_name}: no routing map from layer {self.layer_index - 1}; "
                "reference attention of the first block has no bank (G_1 is unused)"
            )
        hw = layer_hw(tokens, ctx.latent_hw)
        if previous.hw == hw:
            hard = previous.hard.detach()
        else:
            # Training resizes the Gumbel sample that gated layer l-1, so both paths see one routing.
            source = previous.hard if ctx.sampling == "gumbel" else previous.probs
            probs = rearrange(source.detach().float(), "b (h w) r -> b r h w", h=previous.hw[0])
            probs = F.interpolate(probs, size=hw, mode="bilinear", align_corners=False)
            hard = F.one_hot(rearrange(probs, "b r h w -> b (h w) r").argmax(-1), probs.shape[1])
        valid = ctx.refs.valid[:, None, :]
        return hard[..., :-1].bool() & valid  # drop the background route
