"""Bootstrap confidence intervals over validation images. Every evaluation figure is a ratio of sums
over images (a per-image numerator and denominator: a loss and 1, correct subjects and subjects,
IoUs and counted maps), so one resampling of the images gives every figure its interval."""

from __future__ import annotations

import numpy as np

# Resamplings: the interval's ends move by well under 0.01 between seeds at this count.
RESAMPLES = 2000
Pair = tuple[np.ndarray, np.ndarray]  # per-image numerators and denominators


def _figure(value: float, resampled: np.ndarray, n: int, level: float) -> dict[str, float | int | None]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high), "n": n}


def _ratio(num: np.ndarray, den: np.ndarray, picks: np.ndarray | None = None) -> np.ndarray | float:
    if picks is None:
        return float(num.sum() / den.sum())
    return num[picks].sum(1) / den[picks].sum(1)


def _counted(pairs: list[Pair]) -> list[Pair] | None:
    """The pairs restricted to the images every figure counts (denominator > 0); None if none."""
    arrays = [(np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)) for n, d in pairs]
    for n, d in arrays:
        if n.shape != d.shape or n.ndim != 1 or d.shape != arrays[0][1].shape:
            raise ValueError(f"numerators {n.shape} and denominators {d.shape} must be equal 1-d shapes")
    keep = np.logical_and.reduce([d > 0 for _, d in arrays])
    return [(n[keep], d[keep]) for n, d in arrays] if keep.any() else None


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, seed: int = 0, resamples: int = RESAMPLES,
                   level: float = 0.95) -> dict[str, float | int | None]:
    """sum(numerators) / sum(denominators) over the images that count (denominator > 0; `n` of
    them), with the percentile bootstrap interval of the same ratio over those images drawn with
    replacement (numpy, fixed seed)."""
    pairs = _counted([(numerators, denominators)])
    if pairs is None:
        return {"value": None, "low": None, "high": None, "n": 0}
    (num, den), = pairs
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    return _figure(_ratio(num, den), _ratio(num, den, picks), len(num), level)


def difference_interval(a: Pair, b: Pair, seed: int = 0, resamples: int = RESAMPLES,
                        level: float = 0.95) -> dict[str, float | int | None]:
    """ratio(a) - ratio(b) of two figures measured on the same images, with the bootstrap interval
    of the difference: both are recomputed on the same resampled images, so what the images share
    cancels (a paired comparison, narrower than two separate intervals). Images where either
    denominator is zero are left out of both."""
    pairs = _counted([a, b])
    if pairs is None:
        return {"value": None, "low": None, "high": None, "n": 0}
    (na, da), (nb, db) = pairs
    picks = np.random.default_rng(seed).integers(0, len(na), size=(resamples, len(na)))
    return _figure(_ratio(na, da) - _ratio(nb, db), _ratio(na, da, picks) - _ratio(nb, db, picks), len(na), level)
