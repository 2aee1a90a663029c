"""Routing maps as pictures: argmax route per position, one colour per subject, blended over the
generated image; one row per recorded denoising step (labelled with its timestep), one tile per
layer (labelled with its index and map resolution), and a legend pairing each subject's colour with
its reference (the paper's Fig. 5)."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont, ImageOps

from anystory.context import LayerRouting

BASE_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
     [240, 50, 230], [210, 245, 60]], dtype=np.float32,
)
LABEL_WIDTH = 56  # left column: the rows' timesteps
HEADER_HEIGHT = 30  # top row: the columns' layer index and resolution
TEXT = (0, 0, 0)
BACKGROUND = (255, 255, 255)


def palette(n: int) -> np.ndarray:
    """(n, 3) colours, all distinct: the base palette up to its size, beyond it n evenly spaced hues
    (a repeating palette would give two subjects one colour)."""
    if n <= len(BASE_PALETTE):
        return BASE_PALETTE[:n].copy()
    hues = [colorsys.hsv_to_rgb(i / n, 0.85, 0.95) for i in range(n)]
    return np.round(np.array(hues, dtype=np.float32) * 255)


def num_subjects(maps: dict[int, LayerRouting]) -> int:
    return next(iter(maps.values())).probs.shape[-1] - 1  # the last route is the background


def route_colours(routing: LayerRouting, sample: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) colours of the argmax route of one sample and a (size, size) subject mask."""
    h, w = routing.hw
    probs = rearrange(routing.probs[sample].float(), "(h w) r -> 1 r h w", h=h, w=w)
    probs = F.interpolate(probs, size=(size, size), mode="nearest")[0]
    route = probs.argmax(0).cpu().numpy()
    background = probs.shape[0] - 1
    subject = route != background
    colours = np.zeros((size, size, 3), dtype=np.float32)
    colours[subject] = palette(background)[route[subject]]
    return colours, subject


def overlay(image: Image.Image, routing: LayerRouting, sample: int = 0, size: int = 96, alpha: float = 0.55) -> Image.Image:
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    colours, subject = route_colours(routing, sample, size)
    out = np.where(subject[..., None], (1 - alpha) * base + alpha * colours, 0.5 * base)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def cutout(image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    """The reference as the model sees it: RGBA with the mask (or the image's own alpha) as alpha."""
    out = image.convert("RGBA")
    if mask is not None:
        out.putalpha(mask.convert("L").resize(out.size, Image.NEAREST))
    return out


def _on_white(image: Image.Image, size: int) -> Image.Image:
    rgba = ImageOps.pad(image.convert("RGBA"), (size, size), color=(255, 255, 255, 0))
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")


def legend(references: list[Image.Image | None] | None, n: int, tile: int) -> Image.Image:
    """One entry per subject: its colour as a frame around its reference's thumbnail (a plain
    swatch without references) and its number; then the background's (dimmed in the tiles).
    With `references`, a None entry is an empty subject slot (padding) and has no entry."""
    font = _font(12)
    colours = palette(n).astype(np.uint8)
    shown = [k for k in range(n) if references is None or references[k] is not None]
    strip = Image.new("RGB", (LABEL_WIDTH + (len(shown) + 1) * tile, tile + 18), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    draw.text((4, tile // 2), "routes", fill=TEXT, font=font)
    frame, inner = 6, tile - 16
    for slot, k in enumerate([*shown, None]):
        x0 = LABEL_WIDTH + slot * tile + 4
        colour = tuple(int(c) for c in colours[k]) if k is not None else (128, 128, 128)
        draw.rectangle((x0, 2, x0 + inner + 2 * frame - 1, 2 + inner + 2 * frame - 1), fill=colour)
        if k is not None and references is not None:
            strip.paste(_on_white(references[k], inner), (x0 + frame, 2 + frame))
        draw.text((x0, tile + 2), f"subject {k + 1}" if k is not None else "background", fill=TEXT, font=font)
    return strip


def pick_rows(steps: list, max_rows: int) -> list:
    """At most `max_rows` entries, evenly spread from the first to the last."""
    if len(steps) <= max_rows:
        return list(steps)
    idx = torch.linspace(0, len(steps) - 1, max_rows).round().long().tolist()
    return [steps[i] for i in idx]


def routing_panel(
    image: Image.Image,
    steps: list[tuple[int, dict[int, LayerRouting]]],
    sample: int = 0,
    tile: int = 96,
    references: list[Image.Image | None] | None = None,
    max_rows: int = 6,
) -> Image.Image:
    """Rows: recorded steps (label: timestep; at most `max_rows`, evenly spread); columns: the
    image, then every layer in order (label: index and map resolution h x w); below, the legend
    (with each subject's reference when `references` are given, in subject order: RGBA cut-outs
    are shown on white; None marks an empty slot)."""
    if not steps:
        raise ValueError("no routing maps were recorded (is the router on?)")
    steps = pick_rows(steps, max_rows)
    layers = sorted(steps[0][1])
    n = num_subjects(steps[0][1])
    if references is not None and len(references) != n:
        raise ValueError(f"{len(references)} references for routing maps of {n} subjects")
    key = legend(references, n, tile)
    width = max(LABEL_WIDTH + (len(layers) + 1) * tile, key.width)
    grid_height = HEADER_HEIGHT + len(steps) * tile
    panel = Image.new("RGB", (width, grid_height + key.height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    font = _font(12)
    draw.text((LABEL_WIDTH + 4, 8), "image", fill=TEXT, font=font)
    for col, layer in enumerate(layers, start=1):
        h, w = steps[0][1][layer].hw
        draw.text((LABEL_WIDTH + col * tile + 4, 2), f"layer {layer}", fill=TEXT, font=font)
        draw.text((LABEL_WIDTH + col * tile + 4, 15), f"{h}x{w}", fill=TEXT, font=font)
    for row, (timestep, maps) in enumerate(steps):
        y = HEADER_HEIGHT + row * tile
        draw.text((4, y + tile // 2 - 6), f"t={timestep}", fill=TEXT, font=font)
        panel.paste(image.convert("RGB").resize((tile, tile)), (LABEL_WIDTH, y))
        for col, layer in enumerate(layers, start=1):
            panel.paste(overlay(image, maps[layer], sample, tile), (LABEL_WIDTH + col * tile, y))
    panel.paste(key, (0, grid_height))
    return panel


def to_cpu(maps: dict[int, LayerRouting], rows: slice) -> dict[int, LayerRouting]:
    """A detached CPU copy of a batch slice of the maps, for keeping maps across steps."""
    return {layer: m.rows(rows, "cpu") for layer, m in maps.items()}
