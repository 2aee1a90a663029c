from __future__ import annotations

import numpy as np

from pipelines.masks import rle_encode
from pipelines.stages.annotate_given import AnnotateGiven


def test_given_subjects_from_polygons_rle_and_alpha():
    img = np.zeros((20, 30, 3), np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:9, 10:20] = True
    alpha = np.zeros((20, 30), np.uint8)
    alpha[2:6, 3:7] = 255
    anns = [
        {"label": "box", "segmentation": [[10, 5, 19.5, 5, 19.5, 8.5, 10, 8.5]], "identity": 4, "id": 9},
        {"label": "blob", "segmentation": rle_encode(m), "score": 0.7},
        {"label": "crowd", "segmentation": rle_encode(m), "iscrowd": 1},
        {"label": "boxonly", "bbox": [0, 0, 3, 3]},
    ]
    batch = {"image": [img, img, img, img], "alpha": [None, alpha, None, None], "labels": [None, ["cutout"], None, None],
             "annotations": [anns, None, None, [{"label": "x", "segmentation": {"size": [5, 5], "counts": [25]}}]],
             "reject": [None] * 4}
    out = AnnotateGiven()(batch)
    s0 = out["subjects"][0]
    assert [s["label"] for s in s0] == ["box", "blob"]  # crowd and box-only give no instance mask
    assert s0[0]["identity"] == 4 and "id" not in s0[0]
    assert s0[0]["score"] == 1.0 and s0[1]["score"] == 0.7
    np.testing.assert_array_equal(s0[1]["mask"], m)
    assert s0[1]["bbox"] == [10.0, 5.0, 20.0, 9.0]
    assert [s["label"] for s in out["subjects"][1]] == ["cutout"]
    assert out["subjects"][1][0]["bbox"] == [3.0, 2.0, 7.0, 6.0]
    assert out["subjects"][2] == []  # nothing given: the filter will reject it as no_subjects
    assert out["reject"] == [None, None, None, "bad_annotation"]  # RLE of the wrong size
