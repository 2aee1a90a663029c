"""Eq. 4, the instance-aware routing loss, and the ground-truth masks at each layer's size
(paper.md Section 8, items 9 and 22)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from anystory.context import LayerRouting


def downsample_instance_masks(masks: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks (B, N, H, W) in [0, 1] -> (B, N, h, w) in {0, 1}: area-downsampled coverage, kept where
    it reaches 0.5, overlaps resolved to the instance with the larger coverage (each position
    belongs to at most one subject; the background is the complement)."""
    coverage = F.interpolate(masks.float(), size=size, mode="area")
    coverage = coverage * valid[:, :, None, None].to(coverage.dtype)
    best = coverage.argmax(dim=1, keepdim=True)
    owner = torch.zeros_like(coverage).scatter_(1, best, 1.0)
    return owner * (coverage >= 0.5).to(coverage.dtype)


def instance_routes(masks: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ground-truth routes at one layer size: one-hot (B, h * w, N + 1) over the subjects and
    the background (last), as a perfect router would give them."""
    target = rearrange(downsample_instance_masks(masks, valid, size), "b n h w -> b (h w) n")
    return torch.cat([target, 1.0 - target.sum(-1, keepdim=True)], dim=-1)


def routing_loss(
    routing: dict[int, LayerRouting], masks: torch.Tensor, valid: torch.Tensor, coarse_weight: float = 0.0
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
    """Eq. 4 without lambda: per layer the mean over positions of (M_l^i - M_gt^i)^2, averaged over
    the valid subjects of each sample, then over samples and layers. Only the subject routes are
    supervised; the background follows through the softmax. Returns the loss and its mean per
    layer resolution (for logging). `coarse_weight` adds the same term on the coarse maps."""
    if not routing:
        raise ValueError("no routing maps: run the model with router=True")
    valid_f = valid.to(torch.float32)
    per_layer, by_size = [], {}
    targets: dict[tuple[int, int], torch.Tensor] = {}
    for maps in routing.values():
        if maps.hw not in targets:
            targets[maps.hw] = instance_routes(masks, valid, maps.hw)[..., :-1]
        target = targets[maps.hw]
        n = target.shape[-1]
        err = (maps.probs[..., :n] - target).pow(2).mean(dim=1)  # (B, N)
        if coarse_weight:
            err = err + coarse_weight * (maps.coarse[..., :n] - target).pow(2).mean(dim=1)
        layer = ((err * valid_f).sum(1) / valid_f.sum(1).clamp(min=1)).mean()
        per_layer.append(layer)
        by_size.setdefault(maps.hw, []).append(layer)
    return torch.stack(per_layer).mean(), {hw: torch.stack(v).mean() for hw, v in by_size.items()}


def routing_iou(
    probs: torch.Tensor, hw: tuple[int, int], masks: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of the argmax routes (probs (B, h * w, N + 1)) against the instance masks downsampled to
    (h, w). Returns the IoU per subject (B, N) and which entries count: valid subjects whose mask
    is not empty at this resolution."""
    target = instance_routes(masks, valid, hw)[..., :-1].bool()
    n = target.shape[-1]
    predicted = F.one_hot(probs.argmax(-1), probs.shape[-1])[..., :n].bool()
    inter = (predicted & target).sum(1).float()
    union = (predicted | target).sum(1).float()
    counted = valid.bool() & target.any(1)
    return inter / union.clamp(min=1), counted
