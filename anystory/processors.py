"""diffusers attention processors for the two routed injection paths. Each holds only its new
projections (and, for cross-attention, the layer's router) and reuses the frozen layer's
to_q / to_k / to_v / to_out. Per-call state arrives as `anystory=RoutingContext` through
`cross_attention_kwargs`; without it a processor is the plain attention of the layer.

Speed (issue 8): a layer launches few kernels and never synchronises with the host. What depends
only on the call (text and reference K/V, the router's per-route factors, mask skeletons) comes
from the context's caches; at inference each position takes exactly one route, so the N + 1 routed
softmaxes of Eq. 5 are one attention over all routes' tokens with a mask, and the Eq. 7 bias is a
boolean mask built with one comparison from the previous layer's route index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
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
    """(..., n, heads * d) -> (..., heads, n, d), a view."""
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)


def output_projection(attn: Attention, heads_out: torch.Tensor) -> torch.Tensor:
    """(B, heads, n, d) attention output -> the layer's to_out (linear, dropout)."""
    return attn.to_out[1](attn.to_out[0](heads_out.transpose(1, 2).flatten(2)))


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

        def text_kv() -> tuple[torch.Tensor, torch.Tensor]:
            return (split_heads(attn.to_k(encoder_hidden_states), attn.heads),
                    split_heads(attn.to_v(encoder_hidden_states), attn.heads))

        # The prompt does not change between the steps of a generation call: its K/V neither.
        k, v = text_kv() if anystory is None else anystory.per_call(f"{self.layer_index}.text", text_kv)
        out = F.scaled_dot_product_attention(q, k, v)
        if anystory is not None:
            routing = self._route(anystory, hidden_states)
            if anystory.subject_attention and anystory.eta != 0.0:
                subject = self._subject_attention(attn, q, anystory, routing)
                out = out + (subject if anystory.eta == 1.0 else anystory.eta * subject)
        return output_projection(attn, out)

    def _route(self, ctx: RoutingContext, hidden_states: torch.Tensor) -> LayerRouting | None:
        """This layer's routes (also written to ctx.maps); None without a router."""
        if not ctx.router:
            return None
        hw = layer_hw(hidden_states.shape[1], ctx.latent_hw)
        if ctx.given_routes is not None:
            maps = LayerRouting.from_routes(hw, ctx.given_routes(hw).to(hidden_states.dtype))
        else:
            refs = ctx.refs
            plan = ctx.per_call(f"{self.layer_index}.router", lambda: self.router.prepare(
                refs.routing_features, None if refs.all_valid else refs.route_valid))
            coarse, refined = self.router(plan, hidden_states)
            route, gate = hard_routes(refined, ctx.sampling, ctx.tau)
            maps = LayerRouting(hw, route, refined.shape[-1], logits=refined, coarse_logits=coarse, gate=gate)
        ctx.maps[self.layer_index] = maps
        return maps

    def _subject_attention(
        self, attn: Attention, q: torch.Tensor, ctx: RoutingContext, routing: LayerRouting | None
    ) -> torch.Tensor:
        refs = ctx.refs
        tokens = refs.subject_tokens  # (B, R, T, C)
        b, routes, per_route = tokens.shape[:3]
        n = q.shape[2]

        def all_routes_kv() -> tuple[torch.Tensor, torch.Tensor]:
            # (B, heads, R * T, d): the tokens of every route side by side
            return tuple(split_heads(proj(tokens).flatten(1, 2), attn.heads) for proj in (self.to_k, self.to_v))

        if routing is not None and (routing.gate is None or not routing.gate.requires_grad):
            # One route per position: the per-route softmaxes are one softmax over all routes'
            # tokens, each position masked to its route's tokens.
            k, v = ctx.per_call(f"{self.layer_index}.subject", all_routes_kv)
            # Row r of the table: 0 on route r's tokens, MASKED_LOGIT elsewhere; a lookup by the
            # route index gives the mask (B, 1, n, R * T) in one op.
            table = ctx.layout(("route_bias", routes, per_route, q.dtype), lambda: torch.where(
                torch.arange(routes, device=q.device)[:, None] == torch.arange(
                    routes, device=q.device).repeat_interleave(per_route), 0.0, MASKED_LOGIT).to(q.dtype))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=F.embedding(routing.route, table)[:, None])
        if routing is None and refs.all_valid and routes == 2:
            # Router off with one valid subject (stage 1): that subject's tokens everywhere.
            k, v = ctx.per_call(f"{self.layer_index}.subject", all_routes_kv)
            return F.scaled_dot_product_attention(q, k[:, :, :per_route], v[:, :, :per_route])
        # Gates that carry a gradient (Gumbel straight-through), or every valid subject everywhere
        # (router off): one softmax per route, routes folded into the batch of one SDPA call.
        # The same per-call K/V as above (cached within a generation), viewed route by route.
        k, v = (t.unflatten(2, (routes, per_route)).transpose(1, 2).flatten(0, 1)
                for t in ctx.per_call(f"{self.layer_index}.subject", all_routes_kv))
        q_routes = q.unsqueeze(1).expand(-1, routes, -1, -1, -1).flatten(0, 1)
        per_route_out = F.scaled_dot_product_attention(q_routes, k, v).unflatten(0, (b, routes))
        if routing is None and refs.all_valid:
            return per_route_out[:, :-1].sum(1)  # every subject, not the background
        if routing is not None:
            gate = routing.gate  # (B, n, R)
        else:
            # Every valid subject everywhere, no background route.
            gate = ctx.layout("router_off_gate", lambda: torch.cat(
                [refs.valid, torch.zeros_like(refs.valid[:, :1])], dim=1)[:, None, :])
            gate = gate.expand(b, n, routes)
        return torch.einsum("brhnd,bnr->bhnd", per_route_out, gate.to(per_route_out.dtype))


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
        q, k, v = self._qkv(attn, hidden_states, anystory)
        mask = None
        if anystory is not None and anystory.reference_attention and self.uses_reference:
            features = anystory.refs.bank[self.block_name]  # (B, N, m, d)
            ref_k, ref_v = anystory.per_call(f"{self.layer_index}.reference", lambda: tuple(
                split_heads(proj(features).flatten(1, 2), attn.heads) for proj in (self.to_k, self.to_v)
            ))
            k, v = torch.cat([k, ref_k], dim=2), torch.cat([v, ref_v], dim=2)
            mask = self._mask(anystory, hidden_states, features.shape[1], features.shape[2])
        return output_projection(attn, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def _qkv(self, attn: Attention, hidden_states: torch.Tensor,
             ctx: RoutingContext | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's own Q, K, V (B, heads, n, d). Within a generation call the three frozen
        projections run as one matmul over their weights stacked once per call (a transient copy of
        the layer's q/k/v weights, freed with the call); in training, or without a context, as three."""
        projections = (attn.to_q, attn.to_k, attn.to_v)
        if ctx is None or ctx.cache is None or torch.is_grad_enabled() or any(p.bias is not None for p in projections):
            return tuple(split_heads(p(hidden_states), attn.heads) for p in projections)
        weight = ctx.per_call(f"{self.layer_index}.qkv", lambda: torch.cat([p.weight for p in projections]))
        qkv = F.linear(hidden_states, weight).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _mask(self, ctx: RoutingContext, hidden_states: torch.Tensor, subjects: int,
              ref_tokens: int) -> torch.Tensor | None:
        """Eq. 7 as an additive attention bias over [own tokens, reference tokens]: 0 on the own
        tokens, gamma on the allowed references, MASKED_LOGIT on the others; (B, 1, hw or 1, keys)."""
        refs, gamma, dtype = ctx.refs, ctx.gamma, hidden_states.dtype
        tokens = hidden_states.shape[1]
        device = hidden_states.device

        def owner() -> torch.Tensor:  # the subject each key belongs to (-1: the layer's own tokens)
            return torch.cat([torch.full((tokens,), -1, device=device),
                              torch.arange(subjects, device=device).repeat_interleave(ref_tokens)])

        if ctx.router:
            # Row i of the table is the bias of a position routed to route i (the background,
            # route N, sees no reference); a lookup by the previous layer's route gives the bias.
            # A router never routes to a padding subject (its logits are masked), so validity
            # needs no term here.
            def routed() -> torch.Tensor:  # (N + 1, keys)
                keys = owner()
                rows = torch.arange(subjects + 1, device=device)[:, None]
                return torch.where(keys < 0, 0.0, torch.where(rows == keys, gamma, MASKED_LOGIT)).to(dtype)

            table = ctx.layout(("reference_bias", tokens, subjects, ref_tokens, gamma, dtype), routed)
            return F.embedding(self._previous_route(ctx, tokens), table)[:, None]
        if refs.all_valid and gamma == 0.0:
            return None  # every position sees every reference: no mask needed

        def unrouted() -> torch.Tensor:  # (B, 1, 1, keys): the rows do not depend on the position
            keep = torch.cat([torch.ones_like(refs.valid[:, :1]).expand(-1, tokens),
                              refs.valid.repeat_interleave(ref_tokens, dim=1)], dim=1)
            return torch.where(keep, torch.where(owner() < 0, 0.0, gamma), MASKED_LOGIT).to(dtype)[:, None, None]

        return ctx.layout(("unrouted_bias", tokens, subjects, ref_tokens, gamma, dtype), unrouted)

    def _previous_route(self, ctx: RoutingContext, tokens: int) -> torch.Tensor:
        """The route index of sigma(M_{l-1}) at this layer's size (B, hw), detached (paper.md
        Section 8, item 20); at a resolution change the probabilities are resized bilinearly and
        re-argmaxed (item 19)."""
        previous = ctx.maps.get(self.layer_index - 1)
        if previous is None:
            raise RuntimeError(
                f"{self.block_name}: no routing map from layer {self.layer_index - 1}; "
                "reference attention of the first block has no bank (G_1 is unused)"
            )
        hw = layer_hw(tokens, ctx.latent_hw)
        if previous.hw == hw:
            return previous.route
        # Training resizes the Gumbel sample that gated layer l-1, so both paths see one routing.
        source = previous.hard if ctx.sampling == "gumbel" else previous.probs
        probs = source.detach().float().transpose(1, 2).unflatten(2, previous.hw)  # (B, R, h, w)
        probs = F.interpolate(probs, size=hw, mode="bilinear", align_corners=False)
        return probs.flatten(2).argmax(1)
