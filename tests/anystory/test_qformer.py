from __future__ import annotations

import torch

from anystory.config import QFormerConfig
from anystory.qformer import QFormer


def test_shapes_and_that_every_token_sees_the_image():
    cfg = QFormerConfig(input_dim=12, output_dim=20, num_queries=5, width=16, depth=2, heads=2, head_dim=8)
    torch.manual_seed(0)
    qformer = QFormer(cfg)
    tokens = torch.randn(3, 7, 12, requires_grad=True)
    out = qformer(tokens)
    assert out.shape == (3, 5, 20)
    # Sample 0's output depends on sample 0's image only, and on every one of its tokens.
    grad = torch.autograd.grad(out[0].sum(), tokens)[0]
    assert grad[0].abs().sum(-1).min() > 0
    assert not grad[1:].any()
    # Different images give different tokens; the same image gives the same tokens.
    again = qformer(tokens.detach().clone())
    assert torch.allclose(out, again)
    assert not torch.allclose(out[0], out[1])
