from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.toyworld.catalogue import Identity, catalogue
from pipelines.toyworld.render import Placement, background, paint_subject
from training.identity import (
    ABSENT,
    BLENDED,
    NEITHER,
    OWN,
    Appearances,
    IdentityError,
    decide,
    load_catalogue,
    own_appearances,
    region_colours,
    shard_identities,
)

RGB = Appearances(names=["red plain", "green plain", "blue plain"],
                  colours=np.array([[220.0, 40.0, 40.0], [40.0, 170.0, 60.0], [40.0, 80.0, 220.0]]),
                  of_identity={10: 0, 11: 1, 12: 2})


def test_each_region_carries_its_own_another_subjects_or_no_appearance():
    red, green, blue = [200.0, 50.0, 50.0], [50.0, 160.0, 70.0], [50.0, 90.0, 200.0]
    colours = torch.tensor([
        [red, red, green, blue],      # own red; red is subject 0's; green is subject 1's; invalid
        [blue, red, red, red],        # blue: no subject of this image is blue; unknown identity
        [green, green, red, red],     # two green subjects: each is its own, not the other's
    ])
    own = torch.tensor([[0, 1, 2, 0], [0, -1, -1, -1], [1, 1, -1, -1]])
    present = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, False, False]])
    expected = torch.tensor([[OWN, BLENDED, BLENDED, ABSENT],
                             [NEITHER, ABSENT, ABSENT, ABSENT],
                             [OWN, OWN, ABSENT, ABSENT]])
    assert torch.equal(decide(colours, present, own, RGB), expected)


def test_region_colour_is_the_mean_inside_the_eroded_mask():
    image = torch.full((1, 3, 8, 8), -1.0)
    image[0, :, 1:7, 1:7] = -0.2  # a 6x6 block whose one-pixel rim (102) blurs into the background
    image[0, :, 2:6, 2:6] = 0.6  # its inside: 204
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, 1:7, 1:7] = 1.0  # eroded: the inner 4x4 only
    masks[0, 1, 6:8, 6:8] = 1.0  # 2x2: nothing left after erosion, so the whole mask: (102 + 3 x 0) / 4
    masks[0, 2, 0:4, 0:4] = 1.0
    valid = torch.tensor([[True, True, False]])
    colours, present = region_colours(image, masks, valid)
    assert colours[0, 0].tolist() == pytest.approx([204.0] * 3)
    assert colours[0, 1].tolist() == pytest.approx([25.5] * 3)
    assert present.tolist() == [[True, True, False]]


def test_appearances_are_colour_and_texture_drawn_by_the_toy_renderer():
    identities = [Identity(0, "circle", "plain", "red"), Identity(1, "square", "plain", "red"),
                  Identity(2, "star", "dotted", "blue")]
    found = Appearances.of(identities)
    assert found.names == ["blue dotted", "red plain"]
    assert found.of_identity == {0: 1, 1: 1, 2: 0}  # one shape or another: the same appearance
    assert found.colours[1] == pytest.approx([220.0, 40.0, 40.0], abs=0.01)  # plain: the colour itself
    blue, white = np.array([40.0, 80.0, 220.0]), 245.0  # dotted: white dots on the colour
    assert np.all(found.colours[0] > blue) and np.all(found.colours[0] < white)


def test_look_alike_appearances_are_one():
    # Striped and checkered in one colour are both half the colour, half its 0.45 shade: one mean colour.
    found = Appearances.of([Identity(0, "triangle", "striped", "pink"), Identity(1, "diamond", "checkered", "pink"),
                            Identity(2, "circle", "plain", "pink")])
    assert found.names == ["pink checkered | pink striped", "pink plain"]
    assert found.of_identity == {0: 0, 1: 0, 2: 1}


def test_every_catalogue_identity_drawn_on_a_toy_background_reads_as_itself():
    identities = catalogue(16, seed=0)
    appearances = Appearances.of(identities)
    assert len(appearances.names) == 11  # 12 colour-texture kinds, pink striped and checkered alike
    rng = np.random.default_rng(5)
    images, masks = [], []
    for ident in identities:
        canvas = background(rng, 64)
        masks.append(paint_subject(canvas, Placement(ident, 32.0, 32.0, 20.0, float(rng.uniform(0, 6.28)))))
        images.append(canvas)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mask_t = torch.from_numpy(np.stack(masks)).float()[:, None]
    colours, present = region_colours(pixels, mask_t, torch.ones(16, 1, dtype=torch.bool))
    own = torch.tensor([[appearances.of_identity[i.id]] for i in identities])
    assert decide(colours, present, own, appearances).flatten().tolist() == [OWN] * 16


def test_catalogue_errors_name_the_file(tmp_path):
    with pytest.raises(IdentityError, match="missing.json: no such toy-world manifest"):
        load_catalogue(tmp_path / "missing.json")
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"images": {}}))
    with pytest.raises(IdentityError, match="manifest.json: not a toy-world manifest"):
        load_catalogue(bad)
    bad.write_text(json.dumps({"identities": [{"id": 0, "shape": "circle", "texture": "plain", "colour": "red"}]}))
    assert load_catalogue(bad) == [Identity(0, "circle", "plain", "red")]


def test_each_sample_key_has_its_subjects_identities_in_order(shard_dirs):
    # tests/training/shards.py: sample `index` of a shard has 1 + index % 3 subjects, identities 0, 1, ...
    found = shard_identities([str(shard_dirs["val"])])
    assert sorted(len(v) for v in found.values()) == [1, 1, 2, 3]
    assert all(v == list(range(len(v))) for v in found.values())
    own = own_appearances(sorted(found), 4, found, RGB)  # identities 0..2 are not in RGB's catalogue
    assert own.shape == (4, 4) and bool((own == -1).all())
