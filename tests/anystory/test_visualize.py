"""The routing-map picture: labelled rows and columns, a legend with the references, and one
distinct colour per subject however many there are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anystory.visualize import BASE_PALETTE, HEADER_HEIGHT, LABEL_WIDTH, palette, route_colours, routing_panel
from tests.anystory.helpers import make_subjects, unet_inputs

TILE = 96
REF_COLOURS = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]


@torch.no_grad()
def _maps(model, config, subjects: int) -> dict:
    """Routing maps of one sample from a real forward pass of the tiny model."""
    inputs = unet_inputs(config, batch=1)
    refs = model.encode_references(make_subjects(config, [[True] * subjects]))
    return model(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                 inputs["added_cond_kwargs"], refs).routing


def test_palette_gives_every_subject_its_own_colour():
    assert np.array_equal(palette(8), BASE_PALETTE)
    for n in range(1, 41):
        colours = palette(n)
        assert colours.shape == (n, 3) and len({tuple(c) for c in colours}) == n
        assert colours.min() >= 0 and colours.max() <= 255


def test_more_than_eight_subjects_never_share_a_colour(model, tiny_config):
    maps = _maps(model, tiny_config, subjects=12)
    counts = []
    for layer in maps.values():
        routes = layer.probs[0].argmax(-1)
        present = {int(r) for r in routes if int(r) != 12}  # route 12 is the background
        size = layer.hw[0]  # one pixel per position
        colours, subject = route_colours(layer, 0, size)
        counts.append((len(present), len({tuple(c) for c in colours[subject]})))
    assert max(p for p, _ in counts) > 8  # the check below means something
    assert all(p == c for p, c in counts)


def test_panel_labels_rows_and_columns_and_shows_the_references(model, tiny_config):
    maps = _maps(model, tiny_config, subjects=3)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    refs = [Image.new("RGBA", (30, 50), colour + (255,)) for colour in REF_COLOURS]
    panel = routing_panel(image, [(999, maps), (500, maps)], references=refs)
    pixels = np.asarray(panel)
    grid_bottom = HEADER_HEIGHT + 2 * TILE

    # Row labels: only the timesteps differ between these two panels, and only the label column changes.
    relabelled = np.asarray(routing_panel(image, [(10, maps), (20, maps)], references=refs))
    ys, xs = np.nonzero(np.any(pixels != relabelled, axis=-1))
    assert len(xs) and xs.max() < LABEL_WIDTH and ys.min() >= HEADER_HEIGHT and ys.max() < grid_bottom
    for row in range(2):
        assert (pixels[HEADER_HEIGHT + row * TILE:HEADER_HEIGHT + (row + 1) * TILE, :LABEL_WIDTH] < 100).any()

    # Column labels: other layer indices change the header only; every column has its label.
    shifted = {layer + 100: m for layer, m in maps.items()}
    ys, xs = np.nonzero(np.any(pixels != np.asarray(routing_panel(image, [(999, shifted), (500, shifted)],
                                                                  references=refs)), axis=-1))
    assert len(ys) and ys.max() < HEADER_HEIGHT
    for col in range(len(maps) + 1):
        assert (pixels[:HEADER_HEIGHT, LABEL_WIDTH + col * TILE:LABEL_WIDTH + (col + 1) * TILE] < 100).any()

    # Legend: each subject's reference, framed in that subject's colour, below the grid.
    legend = pixels[grid_bottom:]
    for ref_colour, frame_colour in zip(REF_COLOURS, palette(3).astype(np.uint8), strict=True):
        assert (legend == ref_colour).all(-1).sum() >= 40 * 40  # the thumbnail (padded to a square)
        assert (legend == frame_colour).all(-1).sum() >= 4 * 6 * 60  # its frame
    assert not (pixels[:grid_bottom] == REF_COLOURS[0]).all(-1).any()  # references appear nowhere else


def test_panel_needs_one_reference_per_subject(model, tiny_config):
    maps = _maps(model, tiny_config, subjects=2)
    with pytest.raises(ValueError, match="1 references for routing maps of 2 subjects"):
        routing_panel(Image.new("RGB", (64, 64)), [(1, maps)], references=[Image.new("RGB", (8, 8))])
