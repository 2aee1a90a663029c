"""The fixed catalogue of toyworld identities: shape x texture x colour.

An identity is what pairing must preserve; the same identities recur across images and videos, so
pairs exist. Polygons are in unit coordinates (radius 1) and are the exact outline of the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
TEXTURES = ("plain", "striped", "checkered", "dotted", "ringed")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
    "purple": (140, 60, 190), "orange": (240, 130, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}


@dataclass(frozen=True)
class Identity:
    id: int
    shape: str
    texture: str
    colour: str

    @property
    def label(self) -> str:
        return self.shape

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def catalogue(num_identities: int, seed: int) -> list[Identity]:
    """`num_identities` distinct identities, spread over shapes first so the catalogue is varied."""
    rng = np.random.default_rng(seed)
    combos = [(s, t, c) for s in SHAPES for t in TEXTURES for c in COLOURS]
    if num_identities > len(combos):
        raise ValueError(f"toyworld has {len(combos)} identities at most, asked for {num_identities}")
    order = rng.permutation(len(combos))
    # Round-robin over shapes so that e.g. 16 identities use all 7 shapes.
    by_shape: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SHAPES}
    for i in order:
        by_shape[combos[i][0]].append(combos[i])
    picked: list[tuple[str, str, str]] = []
    while len(picked) < num_identities:
        for s in SHAPES:
            if by_shape[s] and len(picked) < num_identities:
                picked.append(by_shape[s].pop())
    return [Identity(i, *combo) for i, combo in enumerate(picked)]


def unit_polygon(shape: str) -> np.ndarray:
    """(K, 2) vertices of the shape around the origin, radius about 1."""
    def ring(n: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "circle":
        pts = ring(40)
    elif shape == "square":
        pts = ring(4, 1.0, math.pi / 4)
    elif shape == "triangle":
        pts = ring(3, 1.0, -math.pi / 2)
    elif shape == "hexagon":
        pts = ring(6)
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "star":
        outer, inner = ring(5, 1.0, -math.pi / 2), ring(5, 0.45, -math.pi / 2 + math.pi / 5)
        pts = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
               (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64)
