"""Reference preparation shared by training and inference: segmented square crops, CLIP input with
the background at the encoder's zero, ReferenceNet input (VAE latents + mask channel)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from anystory.crop import REF_MARGIN, cut_square, mask_box
from anystory.model import Subjects

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def split_mask(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, np.ndarray]:
    """RGB image and boolean mask, from a separate mask image or from the image's alpha channel."""
    if mask is None:
        if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
            raise ValueError("a reference needs a mask: give a mask image or an image with an alpha channel")
        mask = image.convert("RGBA").getchannel("A")
    rgb = image.convert("RGB")
    mask_arr = np.asarray(mask.convert("L").resize(rgb.size, Image.NEAREST)) > 127
    if not mask_arr.any():
        raise ValueError("the reference mask is empty")
    return rgb, mask_arr


def reference_tensors(
    image: np.ndarray, mask: np.ndarray, clip_size: int, ref_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A square, segmented reference (H, W, 3) uint8 + (H, W) bool -> CLIP pixels (3, S, S)
    normalised with the background at 0, ReferenceNet pixels (3, R, R) in [-1, 1] with the
    background at 0, and the mask (1, R, R) in {0, 1} (paper.md Section 8, item 8)."""
    rgb = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
    m = torch.tensor(mask)[None, None].float()
    clip = F.interpolate(rgb, size=(clip_size, clip_size), mode="bicubic", align_corners=False).clamp(0, 1)
    clip_mask = F.interpolate(m, size=(clip_size, clip_size), mode="area") > 0.5
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    clip = (clip - mean) / std * clip_mask
    ref = F.interpolate(rgb, size=(ref_size, ref_size), mode="bicubic", align_corners=False).clamp(0, 1)
    ref_mask = (F.interpolate(m, size=(ref_size, ref_size), mode="area") > 0.5).float()
    ref = (ref * 2 - 1) * ref_mask
    return clip[0], ref[0], ref_mask[0]


def prepare_reference(
    image: Image.Image, mask: Image.Image | None, clip_size: int, ref_size: int, margin: float = REF_MARGIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user's reference (image + mask, or an RGBA image) -> the three tensors of `reference_tensors`,
    cropped as the data build crops the references the model was trained on."""
    rgb, mask_arr = split_mask(image, mask)
    crop, crop_mask = cut_square(np.asarray(rgb), mask_arr, mask_box(mask_arr), margin)
    return reference_tensors(crop, crop_mask, clip_size, ref_size)


@torch.no_grad()
def encode_subjects(
    vae: AutoencoderKL,
    clip_pixels: torch.Tensor,
    ref_pixels: torch.Tensor,
    ref_masks: torch.Tensor,
    valid: torch.Tensor,
    drop: torch.Tensor | None = None,
    all_valid: bool | None = None,
) -> Subjects:
    """(B, N, ...) pixel tensors -> Subjects: references VAE-encoded (distribution mean, so the
    same reference always gives the same features) and masks taken to latent size."""
    b, n = valid.shape
    latents = vae.encode(ref_pixels.flatten(0, 1).to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    masks = F.interpolate(ref_masks.flatten(0, 1).float(), size=latents.shape[-2:], mode="area")
    return Subjects(
        clip_pixels=clip_pixels,
        ref_latents=latents.unflatten(0, (b, n)),
        ref_masks=(masks > 0.5).to(latents.dtype).unflatten(0, (b, n)),
        valid=valid.bool(),
        drop=drop,
        all_valid=all_valid,
    )
