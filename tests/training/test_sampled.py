from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anystory.context import LayerRouting
from anystory.export import load_export, random_export
from anystory.losses import instance_routes
from anystory.pipeline import AnyStoryPipeline
from anystory.preprocess import encode_subjects
from anystory.presets import get_preset
from tests.training.test_identity import RGB
from training.sampled import moved_by_half, routed_masks
from training.validation import identity_pairs


def _one_hot(route: list[int], routes: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(route), routes).float()[None]


def test_subjects_are_located_where_the_finest_maps_route_them():
    # A coarse 1x1 layer says subject 1 everywhere; the finest (2x2) layers route the top row to
    # subject 0 and the bottom-left to subject 1 (bottom-right: background). At 4x4 each 2x2 cell
    # becomes a 2x2 block.
    routing = {0: LayerRouting.from_routes((1, 1), _one_hot([1], 3)),
               1: LayerRouting.from_routes((2, 2), _one_hot([0, 0, 1, 2], 3)),
               2: LayerRouting.from_routes((2, 2), _one_hot([0, 0, 1, 2], 3))}
    masks = routed_masks(routing, 2, (4, 4))
    expected = torch.zeros(2, 4, 4)
    expected[0, :2] = 1.0
    expected[1, 2:, :2] = 1.0
    assert torch.equal(masks, expected)


def test_the_chance_reading_is_taken_away_from_the_subjects():
    # Left half red, right half blue; a red subject drawn on the left, a blue one on the right. Read at
    # their masks each is its own; moved by half the image each mask lies on the other's colour, so
    # each reads as the other subject: blended, never its own.
    image = torch.empty(1, 3, 16, 16)
    image[0, :, :, :8] = torch.tensor([220.0, 40.0, 40.0])[:, None, None] / 127.5 - 1.0
    image[0, :, :, 8:] = torch.tensor([40.0, 80.0, 220.0])[:, None, None] / 127.5 - 1.0
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, 4:12, 1:7] = 1.0
    masks[0, 1, 4:12, 9:15] = 1.0
    batch_at = {"valid": torch.tensor([[True, True]])}
    own = torch.tensor([[0, 2]])  # RGB's red and blue
    at_subjects = identity_pairs(image, batch_at | {"masks": masks}, own, RGB)
    at_chance = identity_pairs(image, batch_at | {"masks": moved_by_half(masks)}, own, RGB)
    assert [float(x) for x in at_subjects["accuracy"]] == [2.0, 2.0]
    assert [float(x) for x in at_chance["accuracy"]] == [0.0, 2.0]
    assert [float(x) for x in at_chance["blending"]] == [2.0, 2.0]


@pytest.mark.slow
def test_given_routes_and_switches_reach_the_pipeline(tmp_path):
    export = random_export(get_preset("tiny"), tmp_path / "export", tmp_path / "tok")
    model, components = load_export(export, device="cpu")
    pipe = AnyStoryPipeline(model, components)
    refs = model.encode_references(encode_subjects(
        components.vae, torch.rand(1, 2, 3, 32, 32), torch.rand(1, 2, 3, 64, 64) * 2 - 1, torch.ones(1, 2, 1, 64, 64),
        torch.ones(1, 2, dtype=torch.bool)))
    masks = torch.zeros(1, 2, 64, 64)
    masks[0, 0, :, :32] = 1.0
    masks[0, 1, :, 32:] = 1.0
    valid = torch.ones(1, 2, dtype=torch.bool)
    given = pipe.generate("a thing", refs, num_inference_steps=2, record_routing=True,
                          given_routes=lambda hw: instance_routes(masks, valid, hw))
    for _, _, maps in given.routing:
        for layer in maps.values():  # the recorded (conditional-branch) maps are the given routes
            assert torch.equal(layer.probs, instance_routes(masks, valid, layer.hw))
    plain = pipe.generate("a thing", refs, num_inference_steps=2).images[0]
    without_refnet = pipe.generate("a thing", refs, num_inference_steps=2, reference_attention=False).images[0]
    assert plain.tobytes() != without_refnet.tobytes()
