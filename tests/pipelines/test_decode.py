from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.config import DecodeConfig
from pipelines.stages.decode import DecodeImages
from tests.pipelines.helpers import jpeg_bytes

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def run(datas: list[bytes | None], cfg: DecodeConfig | None = None) -> dict:
    batch = {"data": list(datas), "reject": [None] * len(datas)}
    return DecodeImages(cfg or DecodeConfig())(batch)


def test_corrupt_inputs_are_rejected_with_their_reason():
    good = jpeg_bytes(RGB)
    out = run([good, good[: len(good) // 2], b"", b"hello, I am text named .jpg\n", None,
               encoded(Image.new("RGB", (4, 4)), "PNG")])
    assert out["reject"] == [None, "truncated", "empty_file", "not_an_image", "read_error", "absurd_size"]
    assert out["image"][0].shape == (40, 60, 3) and out["image"][1] is None


def test_absurd_size_is_refused_before_decoding():
    big = encoded(Image.new("L", (3000, 20)), "PNG")
    out = run([big], DecodeConfig(max_side=2048))
    assert out["reject"] == ["absurd_size"]
    out = run([big], DecodeConfig(max_pixels=1000))
    assert out["reject"] == ["absurd_size"]


def test_modes_normalise_to_rgb_plus_alpha():
    rgba = np.dstack([RGB, np.full((40, 60), 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent band
    gray16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 20)
    inputs = {
        "RGBA": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "CMYK": encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG"),
        "I;16": encoded(Image.fromarray(gray16), "PNG"),
        "L": encoded(Image.fromarray(RGB[..., 0]), "PNG"),
        "P": encoded(Image.fromarray(RGB).convert("P"), "PNG"),
        "1": encoded(Image.fromarray(RGB[..., 0] > 128), "PNG"),
    }
    out = run(list(inputs.values()))
    assert out["reject"] == [None] * len(inputs)
    for img in out["image"]:
        assert img.dtype == np.uint8 and img.shape == (40, 60, 3)
    rgba_img, rgba_alpha = out["image"][0], out["alpha"][0]
    assert rgba_alpha is not None and (rgba_alpha[:10] == 0).all() and (rgba_alpha[10:] == 255).all()
    assert (rgba_img[:10] == 255).all()  # transparent pixels composited over white
    np.testing.assert_array_equal(rgba_img[10:], RGB[10:])
    assert all(a is None for a in out["alpha"][1:])  # opaque modes have no alpha
    g = out["image"][2][..., 0].astype(int)
    np.testing.assert_allclose(g, np.round(gray16 / 65535 * 255), atol=1)  # 16-bit scaled, not clipped


def test_plain_rgb_jpeg_passes_through_and_hash_is_of_pixels():
    a, b = jpeg_bytes(RGB, quality=90), jpeg_bytes(RGB, quality=90)
    png = encoded(Image.fromarray(RGB), "PNG")
    out = run([a, b, png])
    assert out["passthrough"][0] == a and out["passthrough"][2] is None
    assert out["pixel_sha256"][0] == out["pixel_sha256"][1] != out["pixel_sha256"][2]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_other_formats_decode(fmt):
    out = run([encoded(Image.fromarray(RGB), fmt)])
    assert out["reject"] == [None] and out["image"][0].shape == (40, 60, 3)


def _upright_scene() -> tuple[np.ndarray, list[float]]:
    """A 48x80 (HxW) grey image with a red block at a known display position, and its COCO polygon."""
    img = np.full((48, 80, 3), 128, np.uint8)
    img[8:24, 50:74] = (230, 20, 20)
    return img, [50, 8, 74, 8, 74, 24, 50, 24]


@pytest.mark.parametrize("orientation,stored_rot90", [(6, 1), (8, -1), (3, 2)])
def test_exif_rotated_jpeg_decodes_upright_and_given_masks_align(orientation, stored_rot90):
    from pipelines.stages.annotate_given import AnnotateGiven

    upright, polygon = _upright_scene()
    # The camera stores the pixels turned (np.rot90 counter-clockwise k times) and tags how to turn them back.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=stored_rot90)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = encoded(stored, "JPEG", quality=95, exif=exif.tobytes())
    copy = jpeg_bytes(upright, quality=95)
    out = run([rotated, copy])
    assert out["reject"] == [None, None]
    got, ref = out["image"]
    assert got.shape == ref.shape == (48, 80, 3) and (out["width"][0], out["height"][0]) == (80, 48)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3  # the same picture, up to JPEG noise
    assert out["passthrough"][0] is None and out["passthrough"][1] == copy  # turned pixels are re-encoded
    # A mask given in display coordinates covers the red block of the decoded pixels.
    out["annotations"] = [[{"segmentation": [polygon], "label": "block"}]] * 2
    out = AnnotateGiven()(out)
    mask = out["subjects"][0][0]["mask"]
    assert mask[8:24, 50:74].all() and mask.sum() <= 17 * 25  # the polygon, edges included
    red = got[mask].mean(axis=0)
    assert red[0] > 180 and red[1] < 80 and red[2] < 80
