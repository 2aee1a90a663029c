"""Ground-truth routes given to the pipeline (`generate(given_routes=...)`, the evaluation's perfect
router) reach every layer of both CFG branches with the routes' subject order: checked against
what the routes mean, not against the code that expands them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anystory.context import ReferenceEncoding
from anystory.losses import instance_routes
from anystory.pipeline import AnyStoryPipeline


def _reference(seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[8:40, 6:30] = 255
    return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)), Image.fromarray(mask)


def _every_position(route: int, routes: int):
    """given_routes(hw): every position of every layer on one route."""
    return lambda hw: F.one_hot(torch.full((1, hw[0] * hw[1]), route), routes).float()


def _perturbed(refs: ReferenceEncoding, subject: int) -> ReferenceEncoding:
    """The same encoding with one subject's CLIP tokens, routing feature and ReferenceNet features
    replaced by noise (the background / null route, last, is kept)."""
    g = torch.Generator().manual_seed(subject + 1)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, subject] = 3 * torch.randn(t[:, subject].shape, generator=g, dtype=t.dtype)
        return t

    return ReferenceEncoding(noisy(refs.subject_tokens), noisy(refs.routing_features),
                             {k: noisy(v) for k, v in refs.bank.items()}, refs.valid, refs.all_valid)


def _pixels(pipe: AnyStoryPipeline, refs: ReferenceEncoding, **kwargs) -> np.ndarray:
    image = pipe.generate("toys", refs, num_inference_steps=2, guidance_scale=7.5, seed=3, **kwargs).images[0]
    return np.asarray(image).astype(int)


@pytest.fixture
def pipe(model, components) -> AnyStoryPipeline:
    return AnyStoryPipeline(model, components)


@torch.no_grad()
def test_routing_everything_to_the_only_subject_is_the_router_off_image(pipe):
    # One subject: a perfect router that sends every position to it gives each layer what the
    # router-off model gives (that subject's tokens and references everywhere), in both branches.
    refs = pipe.encode([_reference(0)])
    given = _pixels(pipe, refs, given_routes=_every_position(0, 2))
    router_off = _pixels(pipe, refs, router=False)
    background = _pixels(pipe, refs, given_routes=_every_position(1, 2))
    assert np.abs(given - router_off).max() <= 1  # two attention kernels: at most a rounding step
    assert np.abs(given - background).max() > 8  # and the routes matter


@torch.no_grad()
def test_a_subject_no_given_route_points_to_leaves_the_image_unchanged(pipe):
    refs = pipe.encode([_reference(0), _reference(1)])
    to_first = _every_position(0, 3)
    base = _pixels(pipe, refs, given_routes=to_first)
    # Subject 1 is on no route in either CFG branch: nothing of it may reach the image ...
    assert np.array_equal(_pixels(pipe, _perturbed(refs, 1), given_routes=to_first), base)
    # ... while subject 0, on every route, does; and on the background route neither does.
    assert np.abs(_pixels(pipe, _perturbed(refs, 0), given_routes=to_first) - base).max() > 8
    to_background = _every_position(2, 3)
    base = _pixels(pipe, refs, given_routes=to_background)
    assert np.array_equal(_pixels(pipe, _perturbed(refs, 0), given_routes=to_background), base)


def test_instance_routes_keep_rows_and_columns_apart():
    # A 4x8 image: subject 0 fills the top-left 2x4 pixels, subject 1 the bottom row's right half.
    # At layer size (2, 4) positions run row by row (diffusers' (h w) flattening).
    masks = torch.zeros(1, 3, 4, 8)
    masks[0, 0, :2, :4] = 1.0
    masks[0, 1, 2:, 4:] = 1.0
    masks[0, 2] = 1.0  # a padding subject covering everything routes nowhere
    routes = instance_routes(masks, torch.tensor([[True, True, False]]), (2, 4))
    expected = torch.tensor([0, 0, 3, 3,
                             3, 3, 1, 1])
    assert torch.equal(routes[0].argmax(-1), expected)
    assert torch.equal(routes[0].sum(-1), torch.ones(8))
