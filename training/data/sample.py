"""One shard sample (the contract of DESIGN.md) -> training tensors: the target resized and cropped
(to a square, or to its aspect-ratio bucket) with its SDXL size/crop conditioning, instance masks
that follow the same crop, and per subject an augmented, background-removed reference for CLIP and
for the ReferenceNet."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from anystory.preprocess import reference_tensors
from anystory.presets import get_preset
from pipelines.shards.contract import JSON, ContractError, decode_subjects, target_member
from training.data.augment import AugmentConfig, augment_reference, pad_to_square

# SDXL's aspect-ratio buckets (height, width), about 1024^2 pixels each, sides multiples of 64
# (SDXL report, appendix: the multi-aspect training list).
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
)


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """SDXL's buckets scaled from 1024 to `resolution`, sides rounded to `multiple` (at least one),
    without duplicates, by aspect ratio."""
    scale = resolution / 1024
    sizes = {tuple(max(multiple, round(side * scale / multiple) * multiple) for side in bucket)
             for bucket in SDXL_BUCKETS}
    return sorted(sizes, key=lambda hw: (hw[0] / hw[1], hw[0]))


def pick_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio: 2:1 is as far from 1:1 as
    1:2); the smaller crop wins a tie."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - ratio), hw[0] * hw[1]))


class SampleError(ValueError):
    """A shard sample that cannot be used; the reason is counted, the sample skipped."""


class NotSelected(Exception):
    """A good sample this run does not train on (data.sample.max_image_subjects): skipped, not a rejection."""


def check_selected(image_subjects: int, config: SampleConfig, train: bool) -> None:
    """Stage 1 learns from single-subject images (paper.md Section 8, items 23-24): with one reference and
    no router, a second subject in the target is one the reference cannot tell apart from its own, and the
    encoder learns to hedge. Validation keeps every image."""
    if train and config.max_image_subjects is not None and image_subjects > config.max_image_subjects:
        raise NotSelected


# data.sample's image sizes -> the model config's fields they must equal (the data and the model
# cannot disagree: the training CLI, the encoder cache and the evaluation take them from the preset).
PRESET_SIZES = {"resolution": "resolution", "clip_size": "clip_image_size", "ref_size": "ref_size"}


def preset_sizes(config: Any) -> dict[str, int]:
    """data.sample's image sizes of a model config (an AnyStoryConfig or preset)."""
    return {key: getattr(config, field) for key, field in PRESET_SIZES.items()}


class SampleSizeMismatch(ValueError):
    """A data.sample size written in a config that is not the model preset's."""


def checked_preset_sizes(preset_name: str, written: dict[str, Any]) -> dict[str, int]:
    """The image sizes of model preset `preset_name`, after checking that each size `written` in a config
    (None: left out) equals it; the training CLI and the encoder cache both derive their sizes here."""
    sizes = preset_sizes(get_preset(preset_name))
    for key, want in sizes.items():
        if written.get(key) not in (None, want):
            raise SampleSizeMismatch(f"data.sample.{key}: {written[key]} is not the {PRESET_SIZES[key]} of model preset "
                                     f"{preset_name!r} ({want}); leave it out: it is derived from the preset")
    return sizes


@dataclass
class SampleConfig:
    resolution: int = 1024  # square target side (px)
    clip_size: int = 224
    ref_size: int = 512
    max_subjects: int = 4  # padded to this; stage 1 uses 1
    # Train only on images with at most this many subjects (stage 1: 1); None: every image.
    max_image_subjects: int | None = None
    random_crop: bool = True
    shuffle_subjects: bool = True  # the routes must not depend on subject order
    clip_drop: float = 0.1  # CLIP subject condition replaced by the null tokens
    caption_drop: float = 0.05  # empty caption
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    # Aspect-ratio buckets: each target goes to the SDXL bucket (scaled to `resolution`) nearest its
    # aspect ratio instead of a square; a batch holds one bucket. `bucket_multiple`: what every side
    # must divide by, the VAE's factor x the UNet's downsampling (SDXL: 64; tiny preset: 16).
    buckets: bool = False
    bucket_multiple: int = 64


def _image(data: bytes, mode: str, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert(mode))
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleError(f"undecodable {name}") from err


def size_conditioning(meta: dict[str, Any], h: int, w: int, top: int, left: int, scale: float,
                      target: tuple[int, int]) -> list[float]:
    """SDXL's time ids: the input's original size (before the pipeline resized it), the crop's top-left
    in the image as resized for training (the pipeline's centre crop, scaled, plus ours), target size."""
    return [meta.get("original_height", h), meta.get("original_width", w),
            top + round(meta.get("crop_top", 0) * scale), left + round(meta.get("crop_left", 0) * scale),
            target[0], target[1]]


class DecodeSample:
    """Callable on a raw webdataset sample (member name -> bytes); raises SampleError."""

    def __init__(self, config: SampleConfig) -> None:
        self.config = config
        self.buckets = bucket_sizes(config.resolution, config.bucket_multiple) if config.buckets else None

    def __call__(self, sample: dict[str, Any], rng: random.Random, train: bool = True) -> dict[str, Any]:
        cfg = self.config
        try:
            meta = json.loads(sample[JSON])
        except (KeyError, ValueError) as err:
            raise SampleError("missing or invalid json") from err
        subject_entries = meta.get("subjects")
        # Before any image is decoded: a skipped sample costs only its json.
        check_selected(len(subject_entries) if isinstance(subject_entries, list) else 0, cfg, train)
        try:
            ext, data = target_member(sample)
            target = _image(data, "RGB", ext)
            decoded = decode_subjects(sample, meta)
        except ContractError as err:
            raise SampleError(str(err)) from err
        subjects = list(range(len(decoded.refs)))
        if train and cfg.shuffle_subjects:
            rng.shuffle(subjects)
        subjects = subjects[: cfg.max_subjects]

        h, w = target.shape[:2]
        th, tw = pick_bucket(h, w, self.buckets) if self.buckets else (cfg.resolution, cfg.resolution)
        scale = max(th / h, tw / w)  # cover the target size, then crop the rest
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        top = rng.randint(0, nh - th) if train and cfg.random_crop else (nh - th) // 2
        left = rng.randint(0, nw - tw) if train and cfg.random_crop else (nw - tw) // 2
        box = (left, top, left + tw, top + th)

        def fit(img: Image.Image, resample: int) -> np.ndarray:
            return np.asarray(img.resize((nw, nh), resample).crop(box))

        pixels = fit(Image.fromarray(target), Image.BICUBIC)
        s = cfg.max_subjects
        masks = np.zeros((s, th, tw), dtype=np.float32)
        clip = torch.zeros(s, 3, cfg.clip_size, cfg.clip_size)
        refs = torch.zeros(s, 3, cfg.ref_size, cfg.ref_size)
        ref_masks = torch.zeros(s, 1, cfg.ref_size, cfg.ref_size)
        valid = torch.zeros(s, dtype=torch.bool)
        np_rng = np.random.default_rng(rng.getrandbits(64))
        for slot, i in enumerate(subjects):
            if decoded.masks.shape[1:] != (h, w):
                raise SampleError("masks differ in size from the target")
            masks[slot] = fit(Image.fromarray(decoded.masks[i].astype(np.uint8) * 255), Image.BILINEAR) / 255.0
            ref, ref_mask = decoded.refs[i], decoded.ref_masks[i]
            if not ref_mask.any():
                raise SampleError(f"subject {i}: empty reference mask")
            if train and cfg.augment is not None:
                ref, ref_mask = augment_reference(ref, ref_mask, cfg.augment, np_rng)
            ref, ref_mask = pad_to_square(ref, ref_mask)
            clip[slot], refs[slot], ref_masks[slot] = reference_tensors(ref, ref_mask, cfg.clip_size, cfg.ref_size)
            valid[slot] = True

        caption = str(meta.get("caption", ""))
        drop_caption = train and rng.random() < cfg.caption_drop
        return {
            "key": sample.get("__key__", ""),
            "pixels": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0,
            "caption": "" if drop_caption else caption,
            "time_ids": torch.tensor(size_conditioning(meta, h, w, top, left, scale, (th, tw)),
                                     dtype=torch.float32),
            "masks": torch.from_numpy(masks),
            "clip_pixels": clip,
            "ref_pixels": refs,
            "ref_masks": ref_masks,
            "valid": valid,
            "drop": torch.tensor(train and rng.random() < cfg.clip_drop),
            "image_subjects": len(decoded.refs),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
