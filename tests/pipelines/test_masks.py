from __future__ import annotations

import numpy as np
import pytest

from pipelines.masks import (
    mask_bbox,
    mask_iou,
    polygons_to_mask,
    rle_decode,
    rle_encode,
    rle_runs,
    segmentation_to_mask,
)


def hand_mask() -> np.ndarray:
    """4x5; column-major pixels 0 | 1 1 1 | 0 x10 | 1 1 | 0 0 0 0: COCO runs [1, 3, 10, 2, 4]."""
    m = np.zeros((4, 5), bool)
    m[1:4, 0] = True
    m[2:4, 3] = True
    return m


# Compressed counts by hand (COCO's text form: runs after the second are deltas to the run two
# before, in 5-bit groups, 0x20 = more groups follow, 0x10 = sign of the last group, +48 to ASCII):
#   1 -> chr(49) "1";  3 -> "3";  10 -> chr(58) ":";  2-3 = -1 -> 31 -> chr(79) "O";  4-10 = -6 -> 26 -> "J"
#   40 -> groups 8 (| 0x20 -> 40 -> "X") then 1 -> "1";  a first pixel that is set starts with a 0 run: "0"
HAND_CASES = [
    (hand_mask(), [1, 3, 10, 2, 4], "13:OJ"),
    (np.pad(np.ones((8, 1), bool), ((0, 0), (5, 0))), [40, 8], "X18"),
    (np.ones((2, 2), bool), [0, 4], "04"),
    (np.zeros((3, 2), bool), [6], "6"),
]


@pytest.mark.parametrize(("mask", "runs", "counts"), HAND_CASES)
def test_rle_matches_hand_computed_counts(mask, runs, counts):
    size = list(mask.shape)
    assert rle_encode(mask) == {"size": size, "counts": counts}
    assert rle_runs(mask) == runs
    for rle in ({"size": size, "counts": counts}, {"size": size, "counts": counts.encode()},
                {"size": size, "counts": runs}):
        out = rle_decode(rle)
        assert out.dtype == bool and out.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("first", [False, True])
def test_rle_roundtrip(first):
    m = np.random.default_rng(0).random((37, 53)) < 0.3
    m[0, 0] = first
    np.testing.assert_array_equal(rle_decode(rle_encode(m)), m)
    np.testing.assert_array_equal(rle_decode({"size": [37, 53], "counts": rle_runs(m)}), m)


@pytest.mark.parametrize("counts", ["13:O", "13:OJ1", [1, 3, 10, 2], [1, 3, 10, 2, 5], [1, 3, 10, -2, 8]])
def test_rle_runs_that_do_not_cover_the_mask_are_an_error(counts):
    # "13:O" stops 4 pixels short: pycocotools alone would fill them from uninitialised memory.
    with pytest.raises(ValueError):
        rle_decode({"size": [4, 5], "counts": counts})


def test_rle_wrong_size_is_an_error():
    with pytest.raises(ValueError):
        rle_decode({"size": [3, 3], "counts": [4, 2]})
    with pytest.raises(ValueError):
        segmentation_to_mask(rle_encode(np.ones((4, 4), bool)), 5, 5)


def test_polygon_and_bbox():
    m = polygons_to_mask([[2, 2, 9, 2, 9, 6, 2, 6]], 10, 12)
    assert mask_bbox(m) == [2.0, 2.0, 10.0, 7.0]
    assert m.sum() == 8 * 5
    assert mask_bbox(np.zeros((4, 4), bool)) is None


def test_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, np.zeros_like(a)) == 0.0
