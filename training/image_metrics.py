"""CLIP-I, DINO and CLIP-T per subject on generated images, and a blending score (paper.md
Section 8, items 31-32). Each generated subject is cropped where the router placed it at the last
denoising step (the box of its argmax region at the finest routing resolution)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, CLIPModel, CLIPTokenizer

from anystory.model import AnyStoryModel
from anystory.pipeline import AnyStoryPipeline
from anystory.preprocess import CLIP_MEAN, CLIP_STD, encode_subjects
from training.sampled import routed_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 for img in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _subject_boxes(routing: dict, num_subjects: int, size: tuple[int, int]) -> list[tuple[int, int, int, int] | None]:
    """Each subject's box (left, top, right, bottom) around where the routers put it; None if nowhere."""
    boxes = []
    for mask in routed_masks(routing, num_subjects, size):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append(None if len(ys) == 0 else (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return boxes


def _to_image(ref_pixels: torch.Tensor) -> Image.Image:
    array = ((ref_pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


@torch.no_grad()
def subject_similarity(
    model: AnyStoryModel, components, batches, clip_model: str | None, dino_model: str | None,
    steps: int = 25, max_samples: int = 16,
) -> dict[str, Any]:
    device = model.unet.device
    clip = CLIPModel.from_pretrained(clip_model).to(device).eval() if clip_model else None
    tokenizer = CLIPTokenizer.from_pretrained(clip_model) if clip_model else None
    dino = AutoModel.from_pretrained(dino_model).to(device).eval() if dino_model else None
    pipe = AnyStoryPipeline(model, components)

    def clip_embed(images):
        x = _pixels(images, clip.config.vision_config.image_size, CLIP_MEAN, CLIP_STD).to(device)
        return F.normalize(clip.get_image_features(pixel_values=x), dim=-1)

    def dino_embed(images):
        x = _pixels(images, dino.config.image_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
        return F.normalize(dino(pixel_values=x).last_hidden_state[:, 0], dim=-1)

    scores: dict[str, list[float]] = {"clip_i": [], "dino": [], "clip_t": [], "blending_clip": [], "missing": []}
    done = 0
    for batch in batches:
        for b in range(batch["pixels"].shape[0]):
            if done >= max_samples:
                break
            done += 1
            rows = slice(b, b + 1)
            n = int(batch["valid"][b].sum())
            subjects = encode_subjects(components.vae, batch["clip_pixels"][rows].to(device),
                                       batch["ref_pixels"][rows].to(device), batch["ref_masks"][rows].to(device),
                                       batch["valid"][rows].to(device))
            result = pipe.generate(batch["caption"][b], model.encode_references(subjects), num_inference_steps=steps,
                                   seed=done, record_routing=True)
            image = result.images[0]
            boxes = _subject_boxes(result.routing[-1][2], n, image.size[::-1])
            refs = [_to_image(batch["ref_pixels"][b, i]) for i in range(n)]
            crops = [image.crop(box) if box else None for box in boxes]
            scores["missing"].append(sum(c is None for c in crops) / n)
            present = [i for i, c in enumerate(crops) if c is not None]
            if clip is not None:
                tokens = tokenizer([batch["caption"][b]], padding="max_length", truncation=True, return_tensors="pt").to(device)
                text = F.normalize(clip.get_text_features(**tokens), dim=-1)
                scores["clip_t"].append(float(clip_embed([image]) @ text.T))
                if present:
                    ref_e, crop_e = clip_embed([refs[i] for i in present]), clip_embed([crops[i] for i in present])
                    sims = crop_e @ clip_embed(refs).T  # (present, n)
                    scores["clip_i"] += [float(s) for s in (ref_e * crop_e).sum(-1)]
                    if n > 1:
                        wrong = [float(sims[k, j]) for k, i in enumerate(present) for j in range(n) if j != i]
                        scores["blending_clip"].append(float(np.mean(wrong)))
            if dino is not None and present:
                ref_e, crop_e = dino_embed([refs[i] for i in present]), dino_embed([crops[i] for i in present])
                scores["dino"] += [float(s) for s in (ref_e * crop_e).sum(-1)]
    return {k: (float(np.mean(v)) if v else None) for k, v in scores.items()} | {"samples": done}
