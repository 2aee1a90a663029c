from __future__ import annotations

import numpy as np
import pytest

from training.bootstrap import difference_interval, ratio_interval


def test_a_ratio_of_sums_over_the_images_that_count():
    # 1/1 and 0/3 -> (1 + 0) / (1 + 3) = 0.25 (the mean of the per-image ratios would be 0.5);
    # the third image has no denominator and does not count.
    figure = ratio_interval(np.array([1.0, 0.0, 5.0]), np.array([1.0, 3.0, 0.0]))
    assert figure["value"] == 0.25 and figure["n"] == 2
    assert 0.0 <= figure["low"] <= 0.25 <= figure["high"] <= 1.0


def test_images_with_one_ratio_give_a_point_interval():
    figure = ratio_interval(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert figure == {"value": 0.5, "low": 0.5, "high": 0.5, "n": 3}


def test_the_interval_of_a_proportion_matches_the_normal_approximation():
    # 400 images, 100 with a correct subject: p = 0.25, standard error sqrt(p (1 - p) / n) = 0.02165;
    # the 95% interval is about p -+ 1.96 x 0.02165 = 0.2076 .. 0.2924.
    hits = np.zeros(400)
    hits[:100] = 1.0
    figure = ratio_interval(hits, np.ones(400), seed=3)
    assert figure["value"] == 0.25
    assert figure["low"] == pytest.approx(0.2076, abs=0.008)
    assert figure["high"] == pytest.approx(0.2924, abs=0.008)
    assert ratio_interval(hits, np.ones(400), seed=3) == figure  # a fixed seed: the same interval


def test_no_counted_image_gives_no_figure():
    assert ratio_interval(np.array([1.0, 2.0]), np.zeros(2)) == {"value": None, "low": None, "high": None, "n": 0}


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        ratio_interval(np.ones(3), np.ones(4))


def test_a_paired_difference_cancels_what_the_images_share():
    # Per-image losses vary a lot between images; variant a is b + 0.1 on every image. The separate
    # intervals are wide and overlap; the paired difference is exactly 0.1 in every resample.
    rng = np.random.default_rng(0)
    b = rng.uniform(0.0, 1.0, 50)
    a = b + 0.1
    ones = np.ones(50)
    diff = difference_interval((a, ones), (b, ones))
    assert diff["value"] == pytest.approx(0.1) and diff["n"] == 50
    assert diff["low"] == pytest.approx(0.1) and diff["high"] == pytest.approx(0.1)
    separate_a, separate_b = ratio_interval(a, ones), ratio_interval(b, ones)
    assert separate_a["low"] < separate_b["high"]  # the separate intervals overlap


def test_a_paired_difference_leaves_out_images_either_figure_lacks():
    # image 0 counts for both (1/1 vs 0/1), image 1 only for a: the difference is 1 - 0 on image 0.
    diff = difference_interval((np.array([1.0, 1.0]), np.array([1.0, 1.0])),
                               (np.array([0.0, 0.0]), np.array([1.0, 0.0])))
    assert diff == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 1}
