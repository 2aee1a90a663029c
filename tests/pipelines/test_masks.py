from __future__ import annotations

import numpy as np
import pytest

from pipelines.masks import (
    mask_bbox,
    mask_iou,
    polygons_to_mask,
    rle_decode,
    rle_encode,
    segmentation_to_mask,
)


def random_mask(rng, h=37, w=53):
    m = rng.random((h, w)) < 0.3
    m[5:20, 10:30] = True
    return m


@pytest.mark.parametrize("first", [False, True])
def test_rle_roundtrip(first):
    rng = np.random.default_rng(0)
    m = random_mask(rng)
    m[0, 0] = first
    rle = rle_encode(m)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_decode(rle), m)


def test_rle_matches_pycocotools_both_ways():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = random_mask(rng, int(rng.integers(5, 80)), int(rng.integers(5, 80)))
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_encode(m)["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(rle_decode({"size": ref["size"], "counts": ref["counts"].decode()}), m)


def test_uncompressed_rle_counts():
    m = np.zeros((3, 2), bool)
    m[1:, 1] = True  # column-major: 0 0 0 0 1 1
    np.testing.assert_array_equal(rle_decode({"size": [3, 2], "counts": [4, 2]}), m)


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
