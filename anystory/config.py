"""Configuration of an AnyStory model: the base SDXL-shaped components (as plain config dicts,
so that they serialise into the export JSON) and the AnyStory parts (paper.md Section 8 defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class QFormerConfig:
    """Perceiver-resampler QFormer (paper.md Section 8, item 10): learned queries cross-attend to
    [CLIP tokens ; queries], then a projection to the output width and a LayerNorm."""

    input_dim: int  # CLIP hidden size (1280 for ViT-H/14)
    output_dim: int  # UNet cross-attention width for subject tokens; d_r for routing
    num_queries: int
    width: int = 1280
    depth: int = 4
    heads: int = 20
    head_dim: int = 64
    ff_mult: int = 4


@dataclass
class RouterConfig:
    """Per-layer router (paper.md Section 8, item 12). `width` is the space in which the
    projected inner products and the masked cross-attention run; 256 keeps the 70 routers near
    0.1 B parameters instead of ~0.7 B at the UNet's own widths."""

    routing_dim: int  # d_r, width of the routing features R
    width: int = 256
    heads: int = 4
    ffn: bool = True


@dataclass
class AnyStoryConfig:
    preset: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    image_encoder: dict[str, Any]
    subject_qformer: QFormerConfig
    routing_qformer: QFormerConfig
    router: RouterConfig
    clip_image_size: int = 224  # CLIP input px
    ref_size: int = 512  # ReferenceNet input px (latent ref_size / vae factor)
    resolution: int = 1024  # default generation / training target px
    eta: float = 1.0  # strength of the routed CLIP subject attention (Eq. 5)
    gamma: float = 0.0  # logit bias of the reference tokens (Eq. 7)
    # Where real weights come from (paths or hub ids); empty for random-weight presets.
    weights: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])
