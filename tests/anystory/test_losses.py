from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from anystory.context import LayerRouting
from anystory.losses import downsample_instance_masks, routing_iou, routing_loss


def test_downsampled_masks_are_disjoint_and_follow_coverage():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :, :5] = 1  # subject 0: columns 0-4
    masks[0, 1, :, 3:] = 1  # subject 1: columns 3-7, overlapping 3-4
    out = downsample_instance_masks(masks, torch.tensor([[True, True]]), (4, 4))
    assert out.sum(1).max() <= 1  # each position belongs to at most one subject
    # Column 2 of the 4x4 grid covers pixels 4-5: subject 1 covers both, subject 0 one.
    assert out[0, 1, :, 2].all() and not out[0, 0, :, 2].any()
    assert out[0, 0, :, :2].all() and out[0, 1, :, 3].all()
    # A padding subject owns nothing, however large its mask.
    out = downsample_instance_masks(masks, torch.tensor([[True, False]]), (4, 4))
    assert not out[0, 1].any() and out[0, 0, :, :3].all()
    # Below half coverage is background.
    small = torch.zeros(1, 1, 8, 8)
    small[0, 0, 0, 0] = 1
    assert not downsample_instance_masks(small, torch.tensor([[True]]), (4, 4)).any()


def _maps(probs: torch.Tensor, hw: tuple[int, int]) -> LayerRouting:
    # Maps without logits read their probabilities off the gate: `probs` exactly.
    return LayerRouting(hw, probs.argmax(-1), probs.shape[-1], gate=probs)


def test_loss_is_zero_at_the_target_and_the_mean_squared_error_elsewhere():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2] = 1
    masks[0, 1, 2:, :2] = 1
    valid = torch.tensor([[True, True]])
    target = rearrange(downsample_instance_masks(masks, valid, (4, 4)), "b n h w -> b (h w) n")
    background = 1 - target.sum(-1, keepdim=True)
    perfect = torch.cat([target, background], dim=-1)
    loss, by_size = routing_loss({0: _maps(perfect, (4, 4))}, masks, valid)
    assert loss.item() == 0.0 and by_size[(4, 4)].item() == 0.0

    uniform = torch.full((1, 16, 3), 1 / 3)
    loss, _ = routing_loss({0: _maps(uniform, (4, 4)), 1: _maps(perfect, (4, 4))}, masks, valid)
    expected = 0.5 * (uniform[..., :2] - target).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_padding_subjects_and_the_background_are_not_supervised():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2] = 1
    valid = torch.tensor([[True, False]])
    target = rearrange(downsample_instance_masks(masks, valid, (4, 4)), "b n h w -> b (h w) n")
    probs = torch.cat([target[..., :1], torch.rand(1, 16, 1), torch.rand(1, 16, 1)], dim=-1)  # junk in routes 2, 3
    loss, _ = routing_loss({0: _maps(probs, (4, 4))}, masks, valid)
    assert loss.item() == 0.0


def test_loss_gradient_reaches_the_probabilities():
    masks = (torch.rand(2, 2, 8, 8) > 0.5).float()
    logits = torch.randn(2, 16, 3, requires_grad=True)
    loss, _ = routing_loss({0: _maps(logits.softmax(-1), (4, 4))}, masks, torch.ones(2, 2, dtype=torch.bool))
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_iou_of_the_argmax_map():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2] = 1
    masks[0, 1, 2:] = 1
    masks[0, 2] = 0  # a valid subject whose mask is empty
    valid = torch.tensor([[True, True, True]])
    assign = torch.zeros(4, 4, dtype=torch.long)
    assign[2:] = 1
    probs = F.one_hot(assign.flatten(), 4).float()[None]
    iou, counted = routing_iou(probs, (4, 4), masks, valid)
    assert iou[0, :2].tolist() == [1.0, 1.0] and counted[0].tolist() == [True, True, False]
    assign[:, 2:] = 3  # right half background: each subject keeps half its area
    iou, _ = routing_iou(F.one_hot(assign.flatten(), 4).float()[None], (4, 4), masks, valid)
    assert iou[0, :2].tolist() == [0.5, 0.5]
    small = torch.zeros(1, 1, 8, 8)
    small[0, 0, 0, 0] = 1  # vanishes at 2x2
    _, counted = routing_iou(torch.rand(1, 4, 2), (2, 2), small, torch.tensor([[True]]))
    assert counted[0].tolist() == [False]
