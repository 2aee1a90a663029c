from __future__ import annotations

import numpy as np

from anystory.crop import square_box
from pipelines.config import RefsConfig
from pipelines.stages.refs import CutReferences, crop_reference


def test_square_crop_is_centred_with_margin():
    assert square_box([10, 20, 30, 60], 0.1) == (-4, 16, 48)  # side 40 * 1.2, centre (20, 40)


def test_crop_content_mask_and_zero_padding():
    img = np.arange(50 * 50 * 3, dtype=np.uint32).reshape(50, 50, 3).astype(np.uint8)
    mask = np.zeros((50, 50), bool)
    mask[0:10, 0:20] = True  # at the corner: the square extends past the image
    ref, refmask = crop_reference(img, mask, [0, 0, 20, 10], RefsConfig(margin=0.25, max_side=512))
    assert ref.shape == (30, 30, 3) and refmask.shape == (30, 30)
    # crop origin is (-5, -10): the padded area is zero, the rest is the image
    assert (ref[:10] == 0).all() and (ref[:, :5] == 0).all()
    np.testing.assert_array_equal(ref[10:, 5:], img[0:20, 0:25])
    assert refmask.sum() == mask.sum() and refmask[10:20, 5:25].all()


def test_large_crops_are_downscaled_and_masks_stay_binary():
    img = np.full((600, 600, 3), 200, np.uint8)
    mask = np.zeros((600, 600), bool)
    mask[50:550, 50:550] = True
    ref, refmask = crop_reference(img, mask, [50, 50, 550, 550], RefsConfig(margin=0.0, max_side=128))
    assert ref.shape == (128, 128, 3) and refmask.dtype == bool and refmask.all()


def test_unpaired_refs_only_for_live_rows():
    img = np.zeros((40, 40, 3), np.uint8)
    m = np.zeros((40, 40), bool)
    m[5:15, 5:15] = True
    s = {"bbox": [5, 5, 15, 15], "mask": m}
    out = CutReferences(RefsConfig())({"image": [img, img], "subjects": [[dict(s)], [dict(s)]],
                                       "reject": [None, "no_subjects"]})
    assert out["subjects"][0][0]["ref_from"] == "self" and out["subjects"][0][0]["ref"].shape == (12, 12, 3)
    assert "ref" not in out["subjects"][1][0]
