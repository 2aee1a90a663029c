"""The equations of the routed attention, checked against explicit float64 computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from anystory.context import LayerRouting, ReferenceEncoding, RoutingContext
from anystory.processors import RoutedCrossAttnProcessor, RoutedReferenceAttnProcessor
from tests.anystory.helpers import make_subjects, unet_inputs


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None):
    """Explicit softmax attention in float64: (n, c) x (m, c) -> (n, c); bias (n, m)."""
    q, k, v = (rearrange(t.double(), "n (h d) -> h n d", h=heads) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double()
    return rearrange(logits.softmax(-1) @ v, "h n d -> n (h d)")


def _block(model, index: int):
    modules = dict(model.unet.named_modules())
    name = model.block_names[index]
    return name, modules[f"{name}.attn1"], modules[f"{name}.attn2"]


def _refs(model, name: str, b: int, n: int, tokens: int, valid: torch.Tensor, seed: int = 0) -> ReferenceEncoding:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dim = dict(model.unet.named_modules())[f"{name}.attn1"].to_k.in_features
    return ReferenceEncoding(
        subject_tokens=torch.randn(b, n + 1, cfg.subject_qformer.num_queries, cfg.cross_attention_dim, generator=g),
        routing_features=torch.randn(b, n + 1, cfg.router.routing_dim, generator=g),
        bank={name: torch.randn(b, n, tokens, dim, generator=g)},
        valid=valid,
    )


@torch.no_grad()
def test_position_routed_to_a_subject_ignores_other_references(model):
    index = 2  # a block with a preceding layer at the same resolution
    name, attn1, _ = _block(model, index)
    proc = attn1.processor
    assert isinstance(proc, RoutedReferenceAttnProcessor) and proc.uses_reference
    hw, n = (4, 4), 3
    tokens = hw[0] * hw[1]
    hidden = torch.randn(1, tokens, attn1.to_q.in_features)
    refs = _refs(model, name, 1, n, 9, torch.ones(1, n, dtype=torch.bool))
    assignment = torch.arange(tokens) % (n + 1)  # subjects 0..2 and background (3) in turn
    ctx = RoutingContext(refs=refs, latent_hw=hw, router=True)
    ctx.maps[index - 1] = LayerRouting.from_routes(hw, F.one_hot(assignment[None], n + 1).float())
    base = proc(attn1, hidden, anystory=ctx)
    for subject in range(n):
        perturbed = ReferenceEncoding(refs.subject_tokens, refs.routing_features,
                                      {name: refs.bank[name].clone()}, refs.valid)
        perturbed.bank[name][:, subject] += 5 * torch.randn_like(perturbed.bank[name][:, subject])
        ctx.refs = perturbed
        out = proc(attn1, hidden, anystory=ctx)
        changed = (out - base).abs().amax(-1)[0] > 1e-5
        assert torch.equal(changed, assignment == subject), subject


@torch.no_grad()
def test_reference_attention_matches_eqs_6_to_8(model):
    index = 2
    name, attn1, _ = _block(model, index)
    proc = attn1.processor
    hw, n, m = (4, 4), 2, 9
    tokens = hw[0] * hw[1]
    hidden = torch.randn(1, tokens, attn1.to_q.in_features)
    refs = _refs(model, name, 1, n, m, torch.ones(1, n, dtype=torch.bool), seed=1)
    assignment = torch.randint(0, n + 1, (tokens,))
    gamma = 0.7
    ctx = RoutingContext(refs=refs, latent_hw=hw, router=True, gamma=gamma)
    ctx.maps[index - 1] = LayerRouting.from_routes(hw, F.one_hot(assignment[None], n + 1).float())
    out = proc(attn1, hidden, anystory=ctx)

    x, g = hidden[0], refs.bank[name][0]
    keys = torch.cat([attn1.to_k(x), proc.to_k(g.flatten(0, 1))])
    values = torch.cat([attn1.to_v(x), proc.to_v(g.flatten(0, 1))])
    bias = torch.zeros(tokens, tokens + n * m, dtype=torch.float64)
    for i in range(n):
        cols = slice(tokens + i * m, tokens + (i + 1) * m)
        bias[:, cols] = torch.where(assignment[:, None] == i, gamma, -math.inf)
    expected = attn1.to_out[0](_attention(attn1.to_q(x), keys, values, attn1.heads, bias).float())
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_stage1_routing_is_plain_reference_attention(model):
    index = 1  # the first block whose previous map would be needed: without a router none is
    name, attn1, _ = _block(model, index)
    proc = attn1.processor
    tokens, m = 16, 9
    hidden = torch.randn(2, tokens, attn1.to_q.in_features)
    refs = _refs(model, name, 2, 1, m, torch.ones(2, 1, dtype=torch.bool), seed=2)
    out = proc(attn1, hidden, anystory=RoutingContext(refs=refs, latent_hw=(4, 4), router=False))
    for b in range(2):
        x, g = hidden[b], refs.bank[name][b, 0]
        keys = torch.cat([attn1.to_k(x), proc.to_k(g)])
        values = torch.cat([attn1.to_v(x), proc.to_v(g)])
        expected = attn1.to_out[0](_attention(attn1.to_q(x), keys, values, attn1.heads).float())
        torch.testing.assert_close(out[b], expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_routed_cross_attention_matches_eq_5(model):
    index = 3
    name, _, attn2 = _block(model, index)
    proc = attn2.processor
    assert isinstance(proc, RoutedCrossAttnProcessor)
    tokens, n, eta = 16, 2, 0.8
    hidden = torch.randn(1, tokens, attn2.to_q.in_features)
    text = torch.randn(1, 77, model.config.cross_attention_dim)
    refs = _refs(model, name, 1, n, 9, torch.ones(1, n, dtype=torch.bool), seed=3)
    ctx = RoutingContext(refs=refs, latent_hw=(4, 4), router=True, eta=eta)
    out = proc(attn2, hidden, encoder_hidden_states=text, anystory=ctx)
    hard = ctx.maps[index].hard[0]  # (hw, N + 1), written by this call
    assert torch.equal(hard.sum(-1), torch.ones(tokens))

    x = hidden[0]
    q = attn2.to_q(x)
    expected = _attention(q, attn2.to_k(text[0]), attn2.to_v(text[0]), attn2.heads)
    for i in range(n + 1):  # N subjects and the background route, one softmax each
        e = refs.subject_tokens[0, i]
        expected = expected + eta * hard[:, i : i + 1].double() * _attention(q, proc.to_k(e), proc.to_v(e), attn2.heads)
    torch.testing.assert_close(out[0], attn2.to_out[0](expected.float()), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_without_router_every_valid_subject_is_everywhere_and_background_nowhere(model):
    index = 3
    name, _, attn2 = _block(model, index)
    proc = attn2.processor
    hidden = torch.randn(1, 16, attn2.to_q.in_features)
    text = torch.randn(1, 77, model.config.cross_attention_dim)
    refs = _refs(model, name, 1, 2, 9, torch.tensor([[True, False]]), seed=4)
    ctx = RoutingContext(refs=refs, latent_hw=(4, 4), router=False)
    out = proc(attn2, hidden, encoder_hidden_states=text, anystory=ctx)
    assert not ctx.maps
    x = hidden[0]
    q = attn2.to_q(x)
    e = refs.subject_tokens[0, 0]
    expected = _attention(q, attn2.to_k(text[0]), attn2.to_v(text[0]), attn2.heads)
    expected = expected + _attention(q, proc.to_k(e), proc.to_v(e), attn2.heads)
    torch.testing.assert_close(out[0], attn2.to_out[0](expected.float()), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_resolution_change_resizes_the_previous_map(model):
    # Read each layer's resolution off a routed forward pass, then take a layer after a change.
    inputs = unet_inputs(model.config, batch=1)
    subjects = make_subjects(model.config, [[True, True]])
    routing = model(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                    inputs["added_cond_kwargs"], model.encode_references(subjects)).routing
    index = next(i for i in range(1, len(routing)) if routing[i].hw != routing[i - 1].hw)
    prev_hw, hw = routing[index - 1].hw, routing[index].hw
    name, attn1, _ = _block(model, index)
    proc = attn1.processor
    latent = tuple(inputs["noisy_latents"].shape[-2:])
    n = 2
    refs = _refs(model, name, 1, n, 9, torch.ones(1, n, dtype=torch.bool), seed=5)
    left = torch.zeros(prev_hw, dtype=torch.long)
    left[:, prev_hw[1] // 2 :] = 1  # left half subject 0, right half subject 1
    ctx = RoutingContext(refs=refs, latent_hw=latent, router=True)
    ctx.maps[index - 1] = LayerRouting.from_routes(prev_hw, F.one_hot(left.flatten()[None], n + 1).float())
    route = proc._previous_route(ctx, hw[0] * hw[1])[0].reshape(*hw)
    assert (route[:, : hw[1] // 2] == 0).all() and (route[:, hw[1] // 2 :] == 1).all()
