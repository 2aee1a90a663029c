from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from anystory.crop import cut_square, mask_box
from anystory.preprocess import CLIP_MEAN, CLIP_STD, prepare_reference, reference_tensors


def test_square_crop_centres_the_box_and_pads_outside():
    image = np.full((20, 30, 3), 9, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[0:10, 25:30] = True  # touches the top-right corner
    crop, crop_mask = cut_square(image, mask, mask_box(mask), margin=0.1)
    assert crop.shape[0] == crop.shape[1] == 12
    assert crop_mask.sum() == mask.sum()  # the whole subject is inside
    assert (crop[~crop_mask.any(-1)] == 0).any()  # zero padding where the square leaves the image


def test_background_is_the_encoders_zero():
    rgb = np.full((40, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:30, 10:30] = 255
    clip, ref, ref_mask = prepare_reference(Image.fromarray(rgb), Image.fromarray(mask), 16, 32, margin=0.5)
    assert clip.shape == (3, 16, 16) and ref.shape == (3, 32, 32) and ref_mask.shape == (1, 32, 32)
    outside = ref_mask[0] == 0
    assert outside.any() and not ref[:, outside].any()  # 0 in [-1, 1] outside the subject
    inside = ref_mask[0] == 1
    torch.testing.assert_close(ref[:, inside], torch.full_like(ref[:, inside], 200 / 255 * 2 - 1))
    centre = clip[:, 8, 8]
    expected = (200 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(centre, expected, rtol=1e-3, atol=1e-3)
    assert not clip[:, 0, 0].any()


def test_alpha_channel_is_the_mask():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 100
    rgba[4:20, 4:20, 3] = 255
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 4:20] = 255
    a = prepare_reference(Image.fromarray(rgba), None, 16, 32)
    b = prepare_reference(Image.fromarray(rgba[..., :3]), Image.fromarray(mask), 16, 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_reference_prepared_for_inference_is_the_one_training_sees():
    """The data build cuts the reference (pipelines' CutReferences, params' margin); training turns
    the stored crop into tensors (no augmentation: validation). Inference gets the whole image and
    the mask: the same tensors must come out."""
    from pipelines.config import RefsConfig
    from pipelines.stages.refs import CutReferences
    from training.data.augment import pad_to_square

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = np.zeros((90, 120), dtype=bool)
    mask[3:41, 70:117] = True  # near the top-right corner: the square leaves the image
    batch = {"image": [image], "subjects": [[{"mask": mask, "bbox": [70.0, 3.0, 117.0, 41.0]}]]}
    stored = CutReferences(RefsConfig())(batch)["subjects"][0][0]
    trained = reference_tensors(*pad_to_square(stored["ref"], stored["refmask"]), 32, 64)
    inferred = prepare_reference(Image.fromarray(image), Image.fromarray(mask), 32, 64)
    for train_tensor, inference_tensor in zip(trained, inferred, strict=True):
        torch.testing.assert_close(inference_tensor, train_tensor, rtol=0, atol=0)
