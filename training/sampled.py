"""Identity per subject on images sampled from noise with `AnyStoryPipeline` (few steps, a fixed seed
per image). A sampled image has its own layout: each subject is located where the routers put it
at the last denoising step (the argmax route at the finest routing resolution, upsampled), or,
with ground-truth routes, where the layout put it (which an image sampled from noise need not
follow: docs/evaluation.md, "Ground-truth routes on sampled images"). Variants without a router (router off, no
subject condition) leave no map that locates a subject, so they are not measured here (the x0
identity of training.validation covers them). `chance` reads the full model's images at its routed
masks moved by half the image: what a region unrelated to the subject scores."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from anystory.losses import instance_routes
from anystory.pipeline import AnyStoryPipeline
from anystory.preprocess import encode_subjects
from training.identity import Appearances
from training.validation import Pair, identity_pairs, sample_seed

# Pipeline switches of the variants that route (ground-truth routes: given by the layout).
SAMPLED_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "clip_only": dict(reference_attention=False),
    "referencenet_only": dict(subject_attention=False),
    "ground_truth_routes": {},
}


def moved_by_half(masks: torch.Tensor) -> torch.Tensor:
    """The masks moved by half the image down and right (wrapping round): a region that has nothing to
    do with where the subject was drawn, so what the identity read there scores is chance."""
    h, w = masks.shape[-2:]
    return torch.roll(masks, shifts=(h // 2, w // 2), dims=(-2, -1))


def routed_masks(routing: dict, num_subjects: int, size: tuple[int, int]) -> torch.Tensor:
    """(num_subjects, H, W) in {0, 1}: where the finest layers' averaged maps route each subject."""
    finest = max(m.hw[0] * m.hw[1] for m in routing.values())
    layers = [m for m in routing.values() if m.hw[0] * m.hw[1] == finest]
    h, w = layers[0].hw
    probs = torch.stack([m.probs[0].float() for m in layers]).mean(0)  # (h * w, N + 1)
    route = F.interpolate(rearrange(probs, "(h w) r -> 1 r h w", h=h, w=w), size=size, mode="bilinear")[0].argmax(0)
    return torch.stack([(route == i).float() for i in range(num_subjects)])


@torch.no_grad()
def sampled_identity(pipe: AnyStoryPipeline, batch: dict[str, Any], own: torch.Tensor, appearances: Appearances,
                     steps: int, guidance_scale: float = 7.5) -> dict[str, Pair]:
    """`identity_sampled/<variant>/<accuracy|blending>[_multi]` per image of the batch, each image
    sampled with the seed of its key."""
    device = pipe.device
    vae = pipe.components.vae
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for b, key in enumerate(batch["key"]):
        rows = slice(b, b + 1)
        valid = batch["valid"][rows]
        n = int(valid.sum())
        subjects = encode_subjects(vae, batch["clip_pixels"][rows].to(device), batch["ref_pixels"][rows].to(device),
                                   batch["ref_masks"][rows].to(device), valid.to(device))
        refs = pipe.model.encode_references(subjects)
        for name, switches in SAMPLED_VARIANTS.items():
            given = (partial(instance_routes, batch["masks"][rows].to(device), valid.to(device))
                     if name == "ground_truth_routes" else None)
            result = pipe.generate(batch["caption"][b], refs, num_inference_steps=steps, seed=sample_seed(key, 0),
                                   guidance_scale=guidance_scale, record_routing=given is None, given_routes=given,
                                   **switches)
            image = torch.from_numpy(np.array(result.images[0].convert("RGB"))).float()
            image = image.permute(2, 0, 1)[None] / 127.5 - 1.0
            size = tuple(image.shape[-2:])
            if given is None:
                masks = torch.zeros(1, valid.shape[1], *size)
                masks[0, :n] = routed_masks(result.routing[-1][2], n, size)
            else:
                masks = F.interpolate(batch["masks"][rows].float().cpu(), size=size, mode="nearest")
            readings = {name: masks}
            if name == "full":  # the chance level beside it: the full model's image read away from its subjects
                readings["chance"] = moved_by_half(masks)
            for reading, at in readings.items():
                pairs = identity_pairs(image, {"masks": at, "valid": valid.cpu()}, own[rows], appearances)
                for metric, (num, den) in pairs.items():
                    nums, dens = out.setdefault(f"identity_sampled/{reading}/{metric}", ([], []))
                    nums.append(num)
                    dens.append(den)
    return {k: (torch.cat(n), torch.cat(d)) for k, (n, d) in out.items()}
