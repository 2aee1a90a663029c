from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from anystory.losses import instance_routes, routing_iou
from anystory.model import AnyStoryModel
from anystory.processors import RoutedCrossAttnProcessor
from tests.anystory.helpers import make_subjects, unet_inputs


def _forward(model, inputs, refs, **kwargs):
    return model(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                 inputs["added_cond_kwargs"], refs, **kwargs)


@torch.no_grad()
def test_eta_zero_and_no_reference_attention_is_the_plain_unet(model, plain_unet, tiny_config):
    inputs = unet_inputs(tiny_config, batch=2)
    refs = model.encode_references(make_subjects(tiny_config, [[True, True], [True, False]]))
    plain = plain_unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                       added_cond_kwargs=inputs["added_cond_kwargs"]).sample
    for router in (True, False):
        out = _forward(model, inputs, refs, router=router, eta=0.0, reference_attention=False)
        torch.testing.assert_close(out.noise_pred, plain, rtol=0, atol=1e-6)
    # With either path on, the output moves.
    assert not torch.allclose(_forward(model, inputs, refs, eta=1.0, reference_attention=False).noise_pred, plain)
    assert not torch.allclose(_forward(model, inputs, refs, eta=0.0, reference_attention=True).noise_pred, plain)


@torch.no_grad()
def test_routing_maps_are_distributions_over_valid_routes(model, tiny_config):
    inputs = unet_inputs(tiny_config, batch=2)
    refs = model.encode_references(make_subjects(tiny_config, [[True, True, True], [True, False, False]]))
    out = _forward(model, inputs, refs)
    assert sorted(out.routing) == list(range(len(model.block_names)))
    for maps in out.routing.values():
        assert maps.probs.shape[-1] == 4
        torch.testing.assert_close(maps.probs.sum(-1), torch.ones_like(maps.probs[..., 0]))
        torch.testing.assert_close(maps.coarse.sum(-1), torch.ones_like(maps.coarse[..., 0]))
        assert torch.equal(maps.hard.sum(-1), torch.ones_like(maps.hard[..., 0]))
        assert maps.probs[1, :, 1:3].max() < 1e-6  # padding subjects get nothing
        assert not maps.hard[1, :, 1:3].any()
        assert torch.equal(maps.hard.argmax(-1), maps.probs.argmax(-1))  # eval: argmax


@torch.no_grad()
def test_padding_subjects_change_nothing(model, tiny_config):
    inputs = unet_inputs(tiny_config, batch=1)
    padded = make_subjects(tiny_config, [[True, False]], seed=3)
    single = make_subjects(tiny_config, [[True]], seed=3)
    for field in ("clip_pixels", "ref_latents", "ref_masks"):
        setattr(single, field, getattr(padded, field)[:, :1])
    a = _forward(model, inputs, model.encode_references(padded)).noise_pred
    b = _forward(model, inputs, model.encode_references(single)).noise_pred
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gumbel_straight_through_reaches_the_router(model, tiny_config):
    model.set_stage(2)
    model.train()
    inputs = unet_inputs(tiny_config, batch=2)
    refs = model.encode_references(make_subjects(tiny_config, [[True, True], [True, True]]))
    torch.manual_seed(0)
    out = _forward(model, inputs, refs)  # training mode: Gumbel sampling
    F.mse_loss(out.noise_pred, torch.randn_like(out.noise_pred)).backward()  # diffusion loss only
    routers = [p.router for p in model.adapters.values() if isinstance(p, RoutedCrossAttnProcessor)]
    assert all(r.refined_route.weight.grad is not None and r.refined_route.weight.grad.abs().sum() > 0 for r in routers)
    assert model.routing_qformer.proj_out.weight.grad.abs().sum() > 0
    # With a plain argmax there is no path from the noise prediction to any stage-2 parameter.
    out = _forward(model, inputs, refs, sampling="argmax")
    assert not out.noise_pred.requires_grad


def test_stage_parameter_sets_match_the_paper(model):
    stage1, stage2 = model.stage1_parameters(), model.stage2_parameters()
    assert not set(stage1) & set(stage2)
    groups1 = {name.split(".")[0] for name in stage1}
    assert groups1 == {"subject_qformer", "referencenet", "adapters"}
    assert all(name.split(".")[-2] in ("to_k", "to_v") for name in stage1 if name.startswith("adapters."))
    assert any(".attn1." in n.replace("__", ".") for n in stage1 if n.startswith("adapters."))
    assert any(".attn2." in n.replace("__", ".") for n in stage1 if n.startswith("adapters."))
    assert {name.split(".")[0] for name in stage2} == {"routing_qformer", "adapters"}
    assert all(".router." in name for name in stage2 if name.startswith("adapters."))
    # The ReferenceNet is trained in full, minus what runs after its last tapped feature.
    refnet = {n for n in stage1 if n.startswith("referencenet.")}
    all_refnet = {f"referencenet.unet.{n}" for n, _ in model.referencenet.unet.named_parameters()}
    dead = {f"referencenet.unet.{n}" for n in model.referencenet.dead_parameter_names()}
    assert refnet == all_refnet - dead

    for stage, expected in ((1, stage1), (2, stage2)):
        model.set_stage(stage)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in expected.values()}
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    base = [p for n, p in model.unet.named_parameters() if ".processor." not in n]
    assert not any(p.requires_grad for p in base)


@torch.no_grad()
def test_dropped_samples_get_the_null_tokens(model, tiny_config):
    subjects = make_subjects(tiny_config, [[True, True], [True, True]])
    subjects.drop = torch.tensor([True, False])
    refs = model.encode_references(subjects)
    kept = model.encode_references(make_subjects(tiny_config, [[True, True], [True, True]]))
    null = refs.subject_tokens[:, -1]
    assert torch.allclose(refs.subject_tokens[0, 0], null[0]) and torch.allclose(refs.subject_tokens[0, 1], null[0])
    torch.testing.assert_close(refs.subject_tokens[1], kept.subject_tokens[1])
    # Routing features and the ReferenceNet features are not dropped.
    torch.testing.assert_close(refs.routing_features, kept.routing_features)
    assert all(torch.equal(refs.bank[k], kept.bank[k]) for k in refs.bank)


def test_model_builds_on_meta_without_memory(tiny_config, tokenizer_dir):
    from anystory.components import build_random

    comp = build_random(tiny_config, tokenizer_dir, device="meta")
    model = AnyStoryModel(tiny_config, comp.unet, comp.image_encoder)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(model, tiny_config):
    inputs = unet_inputs(tiny_config, batch=2)
    subjects = make_subjects(tiny_config, [[True, True], [True, False]])
    masks = (torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        from anystory.losses import routing_loss

        model.zero_grad(set_to_none=True)
        for unet in (model.unet, model.referencenet.unet):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
        params = model.set_stage(2)
        model.train()
        torch.manual_seed(0)
        out = _forward(model, inputs, model.encode_references(subjects))
        loss = F.mse_loss(out.noise_pred, torch.zeros_like(out.noise_pred))
        loss = loss + 0.1 * routing_loss(out.routing, masks, subjects.valid, coarse_weight=0.5)[0]
        loss.backward()
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    stage2 = model.stage2_parameters()
    assert plain.keys() == checkpointed.keys() == stage2.keys()  # every stage-2 parameter is trained
    # The router's attention key bias adds a constant to a whole softmax row: its gradient is 0 by
    # the equations; every other stage-2 parameter must receive a gradient.
    shift_only = {name for name in stage2 if name.endswith("router.attn_k.bias")}
    assert shift_only and all(plain[name].abs().sum() == 0 for name in shift_only)
    assert all(plain[name].abs().sum() > 0 for name in set(stage2) - shift_only)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_given_routes_replace_the_routers(model, tiny_config):
    # Ground-truth routes from instance masks: subject 0 on the left half, subject 1 on the top right.
    inputs = unet_inputs(tiny_config, batch=1)
    refs = model.encode_references(make_subjects(tiny_config, [[True, True]]))
    size = tiny_config.resolution
    masks = torch.zeros(1, 2, size, size)
    masks[0, 0, :, : size // 2] = 1
    masks[0, 1, : size // 2, size // 2 :] = 1
    valid = torch.ones(1, 2, dtype=torch.bool)
    given = partial(instance_routes, masks, valid)
    out = model(**inputs, refs=refs, given_routes=given)
    routed = model(**inputs, refs=refs)
    for maps in out.routing.values():
        expected = given(maps.hw)
        assert torch.equal(maps.hard, expected) and torch.equal(maps.probs, expected)
        iou, counted = routing_iou(maps.probs, maps.hw, masks, valid)
        assert counted.all() and torch.equal(iou, torch.ones_like(iou))
        # Every position has one route; the bottom right quarter is background.
        h, w = maps.hw
        grid = expected.argmax(-1).view(h, w)
        assert (grid[:, : w // 2] == 0).all() and (grid[: h // 2, w // 2 :] == 1).all()
        assert (grid[h // 2 :, w // 2 :] == 2).all()
    assert not torch.allclose(out.noise_pred, routed.noise_pred)
