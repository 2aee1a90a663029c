"""Stage 1 (images): bytes -> RGB uint8 array (+ alpha), or a rejection reason.

Adds columns `image` (HxWx3 uint8), `alpha` (HxW uint8 or None), `width`, `height`, `pixel_sha256`,
`geometry` (stages/resize.py: the output size policy, applied here) and `passthrough` (the original
bytes when they are already a plain RGB JPEG of the output size that can be written as is).
Images come out in display orientation: an EXIF orientation tag is applied here (as viewers and COCO
tools do), so annotations given in display coordinates line up with the pixels.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import DecodeConfig
from pipelines.stages.resize import output_geometry

EXIF_ORIENTATION = 274


class Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_size(width: int, height: int, cfg: DecodeConfig) -> None:
    if min(width, height) < cfg.min_side or max(width, height) > cfg.max_side or width * height > cfg.max_pixels:
        raise Rejected("absurd_size")


def to_rgb_alpha(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalise any PIL mode to RGB uint8 plus an alpha channel (None when fully opaque)."""
    mode = im.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit data spans 0..65535; 32-bit int / float have no fixed range, so stretch to their max.
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3].copy()
        rgb = rgba[..., :3].astype(np.float64)
        # Composite over white: transparent pixels of cut-outs carry arbitrary colours.
        a = alpha[..., None] / 255.0
        rgb = (rgb * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)
        return rgb, (None if alpha.min() == 255 else alpha)
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB")), None
    raise Rejected("unsupported_mode")


def decode_image(data: bytes | None, cfg: DecodeConfig) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    if data is None:
        raise Rejected("read_error")
    if len(data) == 0:
        raise Rejected("empty_file")
    try:
        with warnings.catch_warnings():
            # check_size (data.decode.max_pixels) is the limit; Pillow's own warning would undercut it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            check_size(im.width, im.height, cfg)  # before decoding pixels: a bomb never gets allocated
            im.load()
    except Rejected:
        raise
    except UnidentifiedImageError as err:
        raise Rejected("not_an_image") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected("absurd_size") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise Rejected("truncated" if "truncated" in str(err).lower() else "decode_error") from err
    upright = im.getexif().get(EXIF_ORIENTATION, 1) == 1
    plain_jpeg = im.format == "JPEG" and im.mode == "RGB" and upright
    if not upright:
        try:
            im = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError) as err:
            raise Rejected("decode_error") from err
    rgb, alpha = to_rgb_alpha(im)
    return np.ascontiguousarray(rgb), alpha, (data if plain_jpeg else None)


@dataclass
class DecodeImages:
    cfg: DecodeConfig

    def __call__(self, batch: Batch) -> Batch:
        for col in ("image", "alpha", "width", "height", "pixel_sha256", "passthrough", "geometry"):
            ensure_column(batch, col)
        ensure_column(batch, "reject")
        for i in list(live_rows(batch)):
            try:
                rgb, alpha, passthrough = decode_image(batch["data"][i], self.cfg)
            except Rejected as r:
                reject(batch, i, r.reason)
                continue
            geometry = output_geometry(rgb.shape[1], rgb.shape[0], self.cfg)
            if not geometry.identity:
                rgb, passthrough = geometry.image(rgb), None
                alpha = None if alpha is None else geometry.image(alpha)
            h, w = rgb.shape[:2]
            batch["image"][i], batch["alpha"][i], batch["passthrough"][i] = rgb, alpha, passthrough
            batch["geometry"][i] = geometry
            batch["width"][i], batch["height"][i] = w, h
            batch["pixel_sha256"][i] = hashlib.sha256(f"{h}x{w}:".encode() + rgb.tobytes()).hexdigest()
            batch["data"][i] = None  # the decoded array replaces the encoded bytes from here on
        return batch
