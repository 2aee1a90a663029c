"""The inventory of the UNet's transformer blocks, in forward order, and the explicit wiring
between them (which block's ReferenceNet features and which previous routing map each one reads)."""

from __future__ import annotations

import math
import re

from diffusers.models.attention import BasicTransformerBlock
from torch import nn

_GROUP_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_key(name: str) -> tuple[int, ...]:
    # named_modules() registers up_blocks before mid_block; the forward order is down, mid, up.
    group = name.split(".")[0]
    return (_GROUP_ORDER[group], *(int(n) for n in re.findall(r"\.(\d+)", name)))


def transformer_block_names(unet: nn.Module) -> list[str]:
    """Names of every BasicTransformerBlock of the UNet in the order the forward pass calls them
    (SDXL: 70, the paper's l = 1..L)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    return sorted(names, key=_forward_key)


def adapter_key(attn_name: str) -> str:
    """ModuleDict key of the adapter of an attention layer ('.' is not allowed in keys)."""
    return attn_name.replace(".", "__")


def layer_hw(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size (h, w) of a layer with `tokens` positions for a latent of size latent_hw; the
    UNet halves the size at each level, rounding up."""
    height, width = latent_hw
    factor = 1
    while math.ceil(height / factor) * math.ceil(width / factor) > tokens:
        factor *= 2
    h, w = math.ceil(height / factor), math.ceil(width / factor)
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens do not match a latent of {latent_hw} at any UNet level")
    return h, w
