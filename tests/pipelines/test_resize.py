"""Output size policy: short side at most `data.decode.max_short_side`, never upscaled, optional centre
crop; given masks follow the pixels and the json records the original size and the crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.build import run_build
from pipelines.config import ConfigError, DecodeConfig, parse_data_config
from pipelines.shards.contract import decode_subjects
from pipelines.stages.annotate_given import AnnotateGiven
from pipelines.stages.decode import DecodeImages
from pipelines.stages.resize import output_geometry
from tests.pipelines.helpers import jpeg_bytes, png_array, read_samples, toy_params

# A 4K frame with a red block at x 1200..2400, y 540..1620 (display coordinates).
W4K, H4K = 3840, 2160
BLOCK = (1200, 540, 2400, 1620)


def _uhd() -> np.ndarray:
    img = np.full((H4K, W4K, 3), 120, np.uint8)
    x0, y0, x1, y1 = BLOCK
    img[y0:y1, x0:x1] = (220, 30, 30)
    return img


def _polygon() -> list[float]:
    x0, y0, x1, y1 = BLOCK
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.mark.parametrize("size,cfg,expected", [
    ((3840, 2160), {}, (1820, 1024, 0, 0, 1820, 1024)),
    ((2160, 3840), {}, (1024, 1820, 0, 0, 1024, 1820)),
    ((500, 300), {}, (500, 300, 0, 0, 500, 300)),  # never upscaled
    ((3840, 2160), {"center_crop": True}, (1820, 1024, 398, 0, 1024, 1024)),
    ((500, 300), {"center_crop": True}, (500, 300, 100, 0, 300, 300)),
    ((3840, 2160), {"max_short_side": None}, (3840, 2160, 0, 0, 3840, 2160)),
])
def test_geometry(size, cfg, expected):
    g = output_geometry(*size, DecodeConfig(**cfg))
    assert (g.resized_width, g.resized_height, g.crop_left, g.crop_top, g.width, g.height) == expected


def test_max_short_side_is_validated():
    with pytest.raises(ConfigError, match=r"data\.decode\.max_short_side"):
        parse_data_config({"decode": {"max_short_side": 0}})


def _expected_mask(scale: float, crop_left: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(certainly inside, possibly inside) of the scaled block: one pixel of slack at its edges."""
    x0, y0, x1, y1 = (v * scale for v in BLOCK)
    inner, outer = np.zeros(shape, bool), np.zeros(shape, bool)
    inner[int(y0) + 1 : int(y1) - 1, int(x0) + 1 - crop_left : int(x1) - 1 - crop_left] = True
    outer[int(y0) - 1 : int(y1) + 2, int(x0) - 1 - crop_left : int(x1) + 2 - crop_left] = True
    return inner, outer


def test_center_crop_moves_given_masks_with_the_pixels():
    batch = {"data": [jpeg_bytes(_uhd(), quality=90)], "reject": [None],
             "annotations": [[{"segmentation": [_polygon()], "label": "block"}]]}
    batch = AnnotateGiven()(DecodeImages(DecodeConfig(center_crop=True))(batch))
    image, mask = batch["image"][0], batch["subjects"][0][0]["mask"]
    assert image.shape == (1024, 1024, 3) and mask.shape == (1024, 1024)
    inner, outer = _expected_mask(1024 / 2160, 398, (1024, 1024))
    assert mask[inner].all() and not mask[~outer].any()
    assert image[inner][:, 0].mean() > 200 and image[~outer][:, 0].mean() < 130  # red block under the mask


def test_a_4k_input_is_written_short_side_1024_with_matching_masks(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_uhd()).save(folder / "uhd.jpg", quality=90)
    coco = {"images": [{"id": 1, "file_name": "uhd.jpg", "width": W4K, "height": H4K, "caption": "a block"}],
            "annotations": [{"id": 1, "image_id": 1, "segmentation": [_polygon()], "label": "block",
                             "area": 1200 * 1080, "bbox": [1200, 540, 1200, 1080], "iscrowd": 0}],
            "categories": []}
    (folder / "annotations.json").write_text(json.dumps(coco))
    params = toy_params(tmp_path / "unused", tmp_path / "out")
    params["data"]["sources"]["unpaired"] = [{"type": "coco", "name": "uhd", "images": str(folder),
                                             "annotations": str(folder / "annotations.json")}]
    run_build(parse_data_config(params["data"]), "unpaired", str(tmp_path / "out"), runner="local")
    (s,) = read_samples(tmp_path / "out" / "unpaired")
    meta = json.loads(s["json"])
    image = png_array(s["jpg"])
    assert image.shape == (1024, 1820, 3) and (meta["width"], meta["height"]) == (1820, 1024)
    assert (meta["original_width"], meta["original_height"], meta["crop_left"], meta["crop_top"]) == (3840, 2160, 0, 0)
    mask = decode_subjects(s, meta).masks[0]
    inner, outer = _expected_mask(1024 / 2160, 0, (1024, 1820))
    assert mask[inner].all() and not mask[~outer].any()
    assert image[inner][:, 0].mean() > 200 and image[~outer][:, 0].mean() < 130  # red block under the mask
    bx0, by0, bx1, by1 = meta["subjects"][0]["bbox"]
    assert abs(bx0 - 1200 * 1024 / 2160) <= 1 and abs(by1 - 1620 * 1024 / 2160) <= 1
