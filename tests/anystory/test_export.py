from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anystory.components import build_random
from anystory.export import ExportMismatchError, load_adapter_weights, load_export, save_export
from anystory.export_format import ExportError
from anystory.model import AnyStoryModel
from tests.anystory.helpers import make_subjects, unet_inputs


@pytest.fixture
def exported(model, components, tmp_path):
    # Move every trainable part off its initialisation so a dropped key would show.
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            if p.is_floating_point():
                p.add_(0.01 * torch.randn_like(p))
    return save_export(model, tmp_path / "export", components=components, metadata={"stage": 2})


@torch.no_grad()
def test_export_load_gives_identical_outputs(model, exported, tiny_config):
    loaded, components = load_export(exported)
    inputs = unet_inputs(tiny_config, batch=2)
    subjects = make_subjects(tiny_config, [[True, True], [True, False]])
    out_a = model(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                  inputs["added_cond_kwargs"], model.encode_references(subjects))
    out_b = loaded(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                   inputs["added_cond_kwargs"], loaded.encode_references(subjects))
    assert torch.equal(out_a.noise_pred, out_b.noise_pred)
    for layer in out_a.routing:
        assert torch.equal(out_a.routing[layer].probs, out_b.routing[layer].probs)
    assert json.loads((exported / "anystory.json").read_text())["metadata"] == {"stage": 2}
    # The base was written without the AnyStory processors.
    base_unet = load_file(str(exported / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in base_unet if ".processor." in k]


def test_missing_key_is_named(exported):
    state = load_file(str(exported / "anystory.safetensors"))
    victim = sorted(k for k in state if ".router." in k)[0]
    del state[victim]
    save_file(state, str(exported / "anystory.safetensors"))
    with pytest.raises(ExportMismatchError, match="missing") as err:
        load_export(exported)
    assert victim in str(err.value)


def test_wrong_shape_and_unexpected_keys_are_named(exported):
    state = load_file(str(exported / "anystory.safetensors"))
    victim = sorted(k for k in state if k.startswith("subject_qformer."))[0]
    state[victim] = torch.zeros(3, 3)
    state["adapters.extra.weight"] = torch.zeros(1)
    save_file(state, str(exported / "anystory.safetensors"))
    with pytest.raises(ExportMismatchError) as err:
        load_export(exported)
    assert victim in str(err.value) and "wrong shape" in str(err.value)
    assert "adapters.extra.weight" in str(err.value)


def test_not_an_export_directory(tmp_path):
    with pytest.raises(ExportError, match="anystory.json"):
        load_export(tmp_path)


def test_loading_validates_first_and_names_the_file(exported):
    # The loader runs the CLI's validation: a truncated base file is named before anything loads.
    vae = exported / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1])
    with pytest.raises(ExportError, match="incomplete metadata") as err:
        load_export(exported)
    assert str(err.value).startswith(f"{vae}: ")


def test_missing_base_weights_name_their_key(exported):
    document = json.loads((exported / "anystory.json").read_text())
    document["base_embedded"] = False
    document["config"]["weights"] = {"image_encoder": "/nonexistent"}
    (exported / "anystory.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="weights.base"):
        load_export(exported)
    document["config"]["weights"] = {"base": str(exported / "base"), "image_encoder": "/nonexistent/clip"}
    (exported / "anystory.json").write_text(json.dumps(document))
    with pytest.raises(FileNotFoundError, match="weights.image_encoder"):
        load_export(exported)


def test_partial_load_takes_the_encoder_into_routers_of_another_width(model, exported, tiny_config, tokenizer_dir):
    # Stage 2 loads the stage-1 export without its (untrained) routers, so the router may change shape.
    wider = copy.deepcopy(tiny_config)
    wider.router = dataclasses.replace(wider.router, width=2 * wider.router.width)
    fresh = build_random(wider, tokenizer_dir, seed=0)
    other = AnyStoryModel(wider, fresh.unet, fresh.image_encoder)
    encoder_keys = set(other.adapter_state_dict()) - set(other.stage2_parameters())
    with pytest.raises(ExportMismatchError, match="wrong shape"):
        load_adapter_weights(other, exported / "anystory.safetensors")
    load_adapter_weights(other, exported / "anystory.safetensors", encoder_keys)
    mine, theirs = model.adapter_state_dict(), other.adapter_state_dict()
    assert encoder_keys and all(torch.equal(mine[k], theirs[k]) for k in encoder_keys)
    routers = [k for k in theirs if ".router." in k and k.endswith("coarse_latent.weight")]
    assert routers and all(theirs[k].shape[0] == 2 * tiny_config.router.width for k in routers)
    # A requested key that the file lacks is still an error that names it.
    state = load_file(str(exported / "anystory.safetensors"))
    victim = sorted(k for k in encoder_keys if k.startswith("subject_qformer."))[0]
    del state[victim]
    save_file(state, str(exported / "anystory.safetensors"))
    with pytest.raises(ExportMismatchError, match="missing") as err:
        load_adapter_weights(other, exported / "anystory.safetensors", encoder_keys)
    assert victim in str(err.value)
