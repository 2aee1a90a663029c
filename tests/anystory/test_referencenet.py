from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock

from anystory.layers import layer_hw
from anystory.processors import RoutedReferenceAttnProcessor
from anystory.referencenet import ReferenceNet
from tests.anystory.helpers import make_subjects


def test_is_the_unet_without_cross_attention(components, plain_unet, tiny_config):
    refnet = ReferenceNet(components.unet, tiny_config.ref_size)
    blocks = [m for m in refnet.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(b.attn2 is None and b.norm2 is None for b in blocks)
    base = plain_unet.state_dict()
    own = refnet.unet.state_dict()
    assert own["conv_in.weight"].shape[1] == 5
    assert torch.equal(own["conv_in.weight"][:, :4], base["conv_in.weight"])
    assert not own["conv_in.weight"][:, 4].any()  # mask channel zero-initialised
    shared = [k for k in own if k != "conv_in.weight"]
    assert all(torch.equal(own[k], base[k]) for k in shared)
    dropped = set(base) - set(own)
    assert dropped and all(".attn2." in k or ".norm2." in k for k in dropped)


def test_bank_feeds_every_reader_with_the_right_shape(model, tiny_config):
    subjects = make_subjects(tiny_config, [[True, True]])
    bank = model.referencenet(subjects.ref_latents.flatten(0, 1), subjects.ref_masks.flatten(0, 1))
    ref_latent = tiny_config.ref_size // tiny_config.vae_scale_factor
    readers = [p for p in model.adapters.values() if isinstance(p, RoutedReferenceAttnProcessor)]
    with_reference = [p for p in readers if p.uses_reference]
    assert len(with_reference) == len(readers) - 1 == len(bank)
    modules = dict(model.unet.named_modules())
    for proc in with_reference:
        features = bank[proc.block_name]  # every reader finds its writer
        attn1 = modules[f"{proc.block_name}.attn1"]
        assert features.shape[0] == 2
        assert features.shape[2] == attn1.to_k.in_features == proc.to_k.in_features
        h, w = layer_hw(features.shape[1], (ref_latent, ref_latent))
        assert h * w == features.shape[1]
    # Block 1 is not banked (G_1 is unused).
    assert model.block_names[0] not in bank


def test_mask_channel_starts_silent_and_then_matters(model, tiny_config):
    subjects = make_subjects(tiny_config, [[True]])
    latents = subjects.ref_latents[:, 0]
    ones, zeros = torch.ones_like(latents[:, :1]), torch.zeros_like(latents[:, :1])
    with torch.no_grad():
        a = model.referencenet(latents, ones)
        b = model.referencenet(latents, zeros)
        assert all(torch.equal(a[k], b[k]) for k in a)
        model.referencenet.unet.conv_in.weight[:, 4] = 0.5
        c = model.referencenet(latents, ones)
    assert not torch.allclose(a[model.block_names[1]], c[model.block_names[1]])


def test_dead_parameters_are_exactly_those_without_gradient(model, tiny_config):
    refnet = model.referencenet
    refnet.requires_grad_(True)
    subjects = make_subjects(tiny_config, [[True]])
    bank = refnet(subjects.ref_latents[:, 0], subjects.ref_masks[:, 0])
    sum(v.pow(2).mean() for v in bank.values()).backward()
    no_grad = {n for n, p in refnet.unet.named_parameters() if p.grad is None or not p.grad.any()}
    assert no_grad == refnet.dead_parameter_names()
    assert no_grad  # the up block after the last tap and conv_out exist in the tiny preset too
