"""Drawing toyworld scenes: backgrounds, textured subjects and their exact visible masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.masks import polygons_to_mask
from pipelines.toyworld.catalogue import COLOURS, Identity, unit_polygon


@dataclass
class Placement:
    identity: Identity
    cx: float
    cy: float
    radius: float
    angle: float  # radians


def polygon(p: Placement) -> np.ndarray:
    """Vertices in pixel coordinates, rounded as stored in COCO JSON so a reader rasterises the same mask."""
    c, s = np.cos(p.angle), np.sin(p.angle)
    rot = np.array([[c, -s], [s, c]])
    return np.round(unit_polygon(p.identity.shape) @ rot.T * p.radius + np.array([p.cx, p.cy]), 3)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted two-colour gradient with a little clutter and noise, different in every scene."""
    a, b = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)[..., None]
    img = a * (1 - t) + b * t
    for _ in range(int(rng.integers(2, 6))):  # soft blobs: clutter that is not a subject
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.05, 0.2) * size]
        blob = ((xx * (size - 1) - cx) ** 2 + (yy * (size - 1) - cy) ** 2) < r**2
        img[blob] = img[blob] * 0.7 + rng.uniform(60, 200, 3) * 0.3
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def paint_subject(img: np.ndarray, p: Placement) -> np.ndarray:
    """Paint the subject into `img` in place; return its full (unoccluded) mask."""
    h, w = img.shape[:2]
    mask = polygons_to_mask([polygon(p).ravel().tolist()], h, w)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask
    # Texture coordinates in the subject's own frame, so the pattern turns and scales with it.
    c, s = np.cos(-p.angle), np.sin(-p.angle)
    dx, dy = (xs - p.cx) / p.radius, (ys - p.cy) / p.radius
    u, v = c * dx - s * dy, s * dx + c * dy
    tex = p.identity.texture
    if tex == "striped":
        alt = np.sin(u * 9.0) > 0
    elif tex == "checkered":
        alt = (np.floor(u * 3.0) + np.floor(v * 3.0)) % 2 == 0
    elif tex == "dotted":
        alt = ((u * 3.0 - np.round(u * 3.0)) ** 2 + (v * 3.0 - np.round(v * 3.0)) ** 2) < 0.09
    elif tex == "ringed":
        alt = np.sin(np.hypot(u, v) * 14.0) > 0
    else:
        alt = np.zeros_like(u, dtype=bool)
    base = np.asarray(COLOURS[p.identity.colour], dtype=np.float64)
    second = base * 0.45 if tex != "dotted" else np.array([245.0, 245.0, 245.0])
    img[ys, xs] = np.where(alt[:, None], second, base).astype(np.uint8)
    return mask


def compose(bg: np.ndarray, placements: list[Placement], occluder: tuple[float, float, float] | None = None,
            ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Draw subjects back to front (+ an optional vertical bar (x, width, grey) on top).

    Returns the image, each subject's visible mask and each subject's full mask.
    """
    img = bg.copy()
    full = [paint_subject(img, p) for p in placements]
    visible = []
    for i, m in enumerate(full):
        v = m.copy()
        for later in full[i + 1 :]:
            v &= ~later
        visible.append(v)
    if occluder is not None:
        x, width, grey = occluder
        x0, x1 = int(round(x)), int(round(x + width))
        img[:, max(x0, 0) : max(x1, 0)] = int(grey)
        for v in visible:
            v[:, max(x0, 0) : max(x1, 0)] = False
    return img, visible, full


CAPTION_STYLES = ("phrase", "label")


def caption(identities: list[Identity], style: str = "phrase") -> str:
    """"phrase" names each subject's colour, texture and shape; "label" only its shape."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; use one of {CAPTION_STYLES}")
    if not identities:
        return "a photo of an empty scene"
    phrases = [f"a {i.phrase if style == 'phrase' else i.label}" for i in identities]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"a photo of {listed}"
