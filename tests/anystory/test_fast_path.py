"""The fast routed path (issue 8): the folded router equals its equations written plainly, the
masked one-softmax gating equals the per-route gated sum, a routed step never synchronises with the
host, and a routed UNet step traces as one graph."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from anystory.config import RouterConfig
from anystory.context import LayerRouting, RoutingContext
from anystory.router import Router
from tests.anystory.helpers import make_subjects, unet_inputs


def _router_by_the_equations(router: Router, routes, latents, route_valid):
    """Paper Section 2.2 as written (float64): project the latents to the router's width, coarse
    inner product, Mask2Former masked attention of the routes over the positions the coarse argmax
    gives them (all positions for a route given none), LN residual + FFN, refined inner product."""
    p = {k: v.double() for k, v in router.state_dict().items()}
    lin = lambda x, name: x @ p[f"{name}.weight"].T + p[f"{name}.bias"]  # noqa: E731
    width, heads = p["coarse_route.weight"].shape[0], router.heads
    d = width // heads
    routes, latents = routes.double(), latents.double()
    query = lin(routes, "coarse_route")  # (b, R, w)
    coarse = torch.einsum("bnc,brc->bnr", lin(latents, "coarse_latent"), query) / math.sqrt(width)
    coarse = coarse.masked_fill(~route_valid[:, None, :], -1e4)
    b, n, r = coarse.shape
    out = torch.empty(b, r, width, dtype=torch.float64)
    q, k, v = lin(query, "attn_q"), lin(latents, "attn_k"), lin(latents, "attn_v")
    for s in range(b):
        for i in range(r):
            allowed = coarse[s].argmax(-1) == i
            if not allowed.any():
                allowed[:] = True
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                logits = q[s, i, cols] @ k[s][allowed][:, cols].T / math.sqrt(d)
                out[s, i, cols] = logits.softmax(-1) @ v[s][allowed][:, cols]
    x = F.layer_norm(query + lin(out, "attn_out"), (width,), p["norm_attn.weight"], p["norm_attn.bias"])
    ffn = lin(F.gelu(lin(x, "ffn.0")), "ffn.2")
    x = F.layer_norm(x + ffn, (width,), p["norm_ffn.weight"], p["norm_ffn.bias"])
    refined = torch.einsum("bnc,brc->bnr", lin(latents, "refined_latent"), lin(x, "refined_route")) / math.sqrt(width)
    return coarse, refined.masked_fill(~route_valid[:, None, :], -1e4)


def test_folded_router_equals_its_equations():
    torch.manual_seed(0)
    router = Router(48, RouterConfig(routing_dim=24, width=32, heads=4, ffn=True))
    with torch.no_grad():  # non-zero biases, so that every folded bias term is exercised
        for name, param in router.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    routes, latents = torch.randn(2, 4, 24), torch.randn(2, 36, 48)
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    coarse, refined = router(router.prepare(routes, valid), latents)
    want_coarse, want_refined = _router_by_the_equations(router, routes, latents, valid)
    for got, want in ((coarse, want_coarse), (refined, want_refined)):
        torch.testing.assert_close(got.double().softmax(-1), want.softmax(-1), rtol=1e-4, atol=1e-5)
        on_valid = valid[:, None, :].expand_as(got)
        torch.testing.assert_close(got[on_valid].double(), want[on_valid], rtol=1e-4, atol=1e-4)
        assert (got[~on_valid] < -1e3).all()
    # With every route valid the plan needs no mask, and gives the same logits.
    all_valid = router(router.prepare(routes[:1], None), latents[:1])
    torch.testing.assert_close(all_valid[1], refined[:1])


@torch.no_grad()
def test_masked_routing_equals_the_gated_sum_of_route_softmaxes(model):
    """Inference gates with a mask over all routes' tokens; training sums one softmax per route,
    each times its gate. With one-hot gates both are Eq. 5."""
    name = model.block_names[3]
    attn2 = dict(model.unet.named_modules())[f"{name}.attn2"]
    refs = model.encode_references(make_subjects(model.config, [[True, True, True]]))
    hidden = torch.randn(1, 16, attn2.to_q.in_features)
    text = torch.randn(1, 77, model.config.cross_attention_dim)
    routes = F.one_hot(torch.randint(0, 4, (1, 16)), 4).float()

    def run(track_gradient: bool) -> torch.Tensor:
        given = routes.clone().requires_grad_(track_gradient)
        ctx = RoutingContext(refs=refs, latent_hw=(4, 4), given_routes=lambda hw: given, eta=0.7)
        with torch.set_grad_enabled(track_gradient):
            return attn2.processor(attn2, hidden, encoder_hidden_states=text, anystory=ctx).detach()

    torch.testing.assert_close(run(False), run(True), rtol=1e-5, atol=1e-6)


SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "is_nonzero", "equal"}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("all_valid", [True, None])
def test_a_routed_step_never_reads_the_device(model, all_valid):
    inputs = unet_inputs(model.config, batch=2)
    subjects = make_subjects(model.config, [[True, True], [True, False]] if all_valid is None else [[True, True]] * 2)
    subjects.all_valid = all_valid
    with torch.no_grad():
        refs = model.encode_references(subjects)
        ctx = model.context(refs, inputs["noisy_latents"].shape[-2:], router=True, cache_reference_kv=True)
        step = lambda: model.unet(inputs["noisy_latents"], inputs["timesteps"],  # noqa: E731
                                  encoder_hidden_states=inputs["encoder_hidden_states"],
                                  added_cond_kwargs=inputs["added_cond_kwargs"], cross_attention_kwargs={"anystory": ctx})
        step()  # the first step fills the per-call caches
        ops = _Ops()
        with ops:
            step()
    assert len(ctx.maps) == len(model.block_names)
    assert not SYNCING & set(ops.names), sorted(SYNCING & set(ops.names))


def test_a_training_step_never_reads_the_device(model):
    inputs = unet_inputs(model.config, batch=2)
    subjects = make_subjects(model.config, [[True, True], [True, False]])
    model.set_stage(2)
    model.train()
    ops = _Ops()
    with ops:
        out = model(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                    inputs["added_cond_kwargs"], model.encode_references(subjects))
        loss = out.noise_pred.square().mean() + sum(m.probs.square().mean() for m in out.routing.values())
        loss.backward()
    model.eval()
    assert not SYNCING & set(ops.names), sorted(SYNCING & set(ops.names))


def test_routed_step_traces_as_one_graph(model):
    inputs = unet_inputs(model.config, batch=1)
    subjects = make_subjects(model.config, [[True, True]])
    subjects.all_valid = True
    with torch.no_grad():
        refs = model.encode_references(subjects).for_cfg()
        ctx = model.context(refs, inputs["noisy_latents"].shape[-2:], router=True, cache_reference_kv=True)
        latents = torch.cat([inputs["noisy_latents"]] * 2)
        kwargs = dict(encoder_hidden_states=torch.cat([inputs["encoder_hidden_states"]] * 2),
                      added_cond_kwargs={k: torch.cat([v] * 2) for k, v in inputs["added_cond_kwargs"].items()},
                      cross_attention_kwargs={"anystory": ctx})
        eager = model.unet(latents, inputs["timesteps"], **kwargs).sample
        compiled = torch.compile(model.unet, fullgraph=True, backend="aot_eager", dynamic=False)
        traced = compiled(latents, inputs["timesteps"], **kwargs).sample
        again = compiled(latents, inputs["timesteps"], **kwargs).sample  # the cached per-call values
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    assert isinstance(ctx.maps[len(model.block_names) - 1], LayerRouting)
