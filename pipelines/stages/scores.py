"""Stage 3b: score filters, the hook for CLIP-score, aesthetic and other per-image quality models.

Off by default (`data.filter.score_filters: []`). Each entry names a scorer class
(`package.module:Class`), built once per stage instance with `args`; an instance is called on a
list of RGB images (HxWx3 uint8) and their captions and returns one float per image. A row scoring
below the entry's `min_score` is rejected as `low_<name>`; the scores of every kept row go into the
sample json (`quality.scores`). A scorer is any class with that call: a CLIP score (cosine of
image and caption embeddings), an aesthetic predictor, or the built-in `Sharpness` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from anystory.typed_config import ConfigError
from pipelines.batch import Batch, ensure_column, live_rows, reject


class ImageScorer(Protocol):
    def __call__(self, images: list[np.ndarray], captions: list[str]) -> Sequence[float]: ...


def resolve_scorer(spec: str, path: str) -> type:
    """The class named by `package.module:Class`; a one-line ConfigError naming `path` otherwise."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{path}: {spec!r} is not of the form package.module:Class")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{path}: cannot load {spec!r} ({err})") from err
    if not callable(cls):
        raise ConfigError(f"{path}: {spec!r} is not a class")
    return cls


@dataclass
class Sharpness:
    """Variance of the Laplacian of the grey image, a common blur score (higher: sharper)."""

    def __call__(self, images: list[np.ndarray], captions: list[str]) -> list[float]:
        out = []
        for image in images:
            g = image.astype(np.float32).mean(axis=2)
            lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
            out.append(float(lap.var()))
        return out


@dataclass
class ScoreImages:
    """Runs the configured scorers (data.filter.score_filters) on the live rows."""

    filters: list[Any]  # config.ScoreFilterConfig
    _scorers: list[ImageScorer] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._scorers = [resolve_scorer(f.scorer, f"score_filters[{k}].scorer")(**f.args)
                         for k, f in enumerate(self.filters)]

    def __call__(self, batch: Batch) -> Batch:
        if not self.filters:
            return batch
        ensure_column(batch, "scores")
        for f, scorer in zip(self.filters, self._scorers, strict=True):
            rows = list(live_rows(batch))
            if not rows:
                break
            values = list(scorer([batch["image"][i] for i in rows], [batch["caption"][i] for i in rows]))
            if len(values) != len(rows):
                raise ValueError(f"scorer {f.name!r} returned {len(values)} scores for {len(rows)} images")
            for i, v in zip(rows, values, strict=True):
                batch["scores"][i] = {**(batch["scores"][i] or {}), f.name: round(float(v), 4)}
                if not v >= f.min_score:  # NaN fails too
                    reject(batch, i, f"low_{f.name}")
        return batch
