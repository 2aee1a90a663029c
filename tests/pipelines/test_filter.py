from __future__ import annotations

import numpy as np

from pipelines.config import FilterConfig
from pipelines.masks import mask_bbox
from pipelines.stages.filter import DropDuplicates, FilterSubjects, subject_drop_reason, subject_measures


def subject(y0, x0, y1, x1, score=1.0, size=100, fill=None):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    if fill is not None:  # keep only a fraction of the box's rows
        m[y0 + max(1, int((y1 - y0) * fill)) : y1, x0:x1] = False
        m[y1 - 1, x1 - 1] = True
    return {"label": "x", "bbox": mask_bbox(m), "score": score, "mask": m}


def run(subjects_per_row, cfg: FilterConfig | None = None, shape=(100, 100)):
    cfg = cfg or FilterConfig()
    n = len(subjects_per_row)
    batch = {"image": [np.zeros((*shape, 3), np.uint8)] * n, "subjects": subjects_per_row, "reject": [None] * n}
    return FilterSubjects(cfg)(batch)


def test_each_subject_threshold():
    cfg = FilterConfig(min_score=0.3, min_area_frac=0.02, max_area_frac=0.8, min_box_fill=0.25, max_box_aspect=4.0)
    out = run([[
        subject(10, 10, 40, 40),  # keep: 9% of the image
        subject(50, 50, 80, 80, score=0.29),  # low score
        subject(0, 0, 10, 10),  # 1%: too small
        subject(0, 0, 95, 95),  # 90%: too large
        subject(10, 50, 90, 90, fill=0.2),  # sparse in its box
        subject(85, 0, 89, 60),  # aspect 15
    ]], cfg)
    assert len(out["subjects"][0]) == 1 and out["subjects"][0][0]["area_frac"] == 0.09
    assert sorted(out["dropped"][0]) == sorted(["low_score", "small_area", "large_area", "sparse_mask", "box_aspect"])
    assert out["reject"] == [None]


def test_the_check_reads_a_subject_without_changing_it():
    s = subject(10, 10, 40, 40, fill=0.5)  # rows 10-24 of the 30x30 box, plus its last pixel: 451 pixels
    keys = set(s)
    measures = subject_measures(s, 100 * 100)
    assert measures == {"area_frac": 451 / 10000, "box_fill": 451 / 900}
    assert subject_drop_reason(s, measures, FilterConfig(min_area_frac=0.05)) == "small_area"
    assert subject_drop_reason(s, measures, FilterConfig(min_area_frac=0.04, min_box_fill=0.6)) == "sparse_mask"
    assert subject_drop_reason(s, measures, FilterConfig(min_area_frac=0.04, min_box_fill=0.5)) is None
    out = run([[s]], FilterConfig(min_area_frac=0.04, min_box_fill=0.5))
    assert set(s) == keys  # the kept subject is a new dict with the measures
    assert {k: out["subjects"][0][0][k] for k in measures} == measures


def test_boundaries_are_inclusive():
    # exactly min_area_frac and exactly min_score are kept
    out = run([[subject(0, 0, 20, 10, score=0.3)]], FilterConfig(min_score=0.3, min_area_frac=0.02))
    assert out["reject"] == [None] and out["subjects"][0][0]["area_frac"] == 0.02


def test_overlap_contained_and_duplicate_instances():
    big = subject(10, 10, 60, 60)
    inside = subject(20, 20, 40, 40)
    twin = subject(11, 11, 60, 60)
    out = run([[big, inside], [big, twin]], FilterConfig(max_containment=0.8, max_instance_iou=0.7))
    assert len(out["subjects"][0]) == 1 and out["dropped"][0] == ["contained"]
    assert len(out["subjects"][1]) == 1 and out["dropped"][1] == ["duplicate_instance"]


def test_image_level_rejections():
    two = [subject(0, 0, 30, 30), subject(50, 50, 80, 80)]
    cfg = FilterConfig(min_subjects=2, max_subjects=2)
    out = run([[], [two[0]], two, two + [subject(0, 60, 30, 90)], [subject(0, 0, 1, 1)]], cfg)
    assert out["reject"] == ["no_subjects", "too_few_subjects", None, "too_many_subjects", "no_subjects"]
    assert run([two], FilterConfig(min_image_side=128))["reject"] == ["image_too_small"]
    assert run([two], FilterConfig(max_image_aspect=1.5), shape=(100, 200))["reject"] == ["image_aspect"]


def test_exact_duplicates_within_a_shard():
    batch = {"pixel_sha256": ["a", "b", "a", "c", "b"], "reject": [None, None, None, "truncated", None]}
    out = DropDuplicates(True)(batch)
    assert out["reject"] == [None, None, "duplicate", "truncated", "duplicate"]
    assert DropDuplicates(False)({"pixel_sha256": ["a", "a"], "reject": [None, None]})["reject"] == [None, None]
