"""Routing maps as pictures: argmax route per position, one colour per subject, blended over the
generated image; one row per recorded denoising step, one tile per layer (the paper's Fig. 5)."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from anystory.context import LayerRouting

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
     [240, 50, 230], [210, 245, 60]], dtype=np.float32,
)


def route_colours(routing: LayerRouting, sample: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) colours of the argmax route of one sample and a (size, size) subject mask."""
    h, w = routing.hw
    probs = rearrange(routing.probs[sample].float(), "(h w) r -> 1 r h w", h=h, w=w)
    probs = F.interpolate(probs, size=(size, size), mode="nearest")[0]
    route = probs.argmax(0).cpu().numpy()
    background = probs.shape[0] - 1
    colours = PALETTE[route % len(PALETTE)]
    return colours, route != background


def overlay(image: Image.Image, routing: LayerRouting, sample: int = 0, size: int = 96, alpha: float = 0.55) -> Image.Image:
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    colours, subject = route_colours(routing, sample, size)
    out = np.where(subject[..., None], (1 - alpha) * base + alpha * colours, 0.5 * base)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def routing_panel(
    image: Image.Image, steps: list[tuple[int, dict[int, LayerRouting]]], sample: int = 0, tile: int = 96
) -> Image.Image:
    """Rows: recorded steps (label = timestep); columns: the image, then every layer in order."""
    if not steps:
        raise ValueError("no routing maps were recorded (is the router on?)")
    layers = sorted(steps[0][1])
    panel = Image.new("RGB", ((len(layers) + 1) * tile, len(steps) * tile), (255, 255, 255))
    for row, (_, maps) in enumerate(steps):
        panel.paste(image.convert("RGB").resize((tile, tile)), (0, row * tile))
        for col, layer in enumerate(layers, start=1):
            panel.paste(overlay(image, maps[layer], sample, tile), (col * tile, row * tile))
    return panel


def to_cpu(maps: dict[int, LayerRouting], rows: slice) -> dict[int, LayerRouting]:
    """A detached CPU copy of a batch slice of the maps, for keeping maps across steps."""
    return {
        layer: LayerRouting(hw=m.hw, probs=m.probs[rows].detach().cpu(), hard=m.hard[rows].detach().cpu(),
                            coarse=m.coarse[rows].detach().cpu())
        for layer, m in maps.items()
    }


