"""Parameter counts of a preset, built on the meta device (no weights, no memory): the numbers
behind the paper's Table 1 and the size of every part AnyStory adds."""

from __future__ import annotations

import tempfile

from torch import nn

from anystory.components import build_random
from anystory.config import AnyStoryConfig
from anystory.model import AnyStoryModel
from anystory.processors import RoutedCrossAttnProcessor, RoutedReferenceAttnProcessor


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _base_count(module: nn.Module) -> int:
    # Installed processors register as submodules of the UNet; the base count leaves them out.
    return _count(p for n, p in module.named_parameters() if ".processor." not in n)


def inspect_preset(config: AnyStoryConfig) -> dict:
    with tempfile.TemporaryDirectory() as tok:
        components = build_random(config, tok, device="meta")
    model = AnyStoryModel(config, components.unet, components.image_encoder)
    cross = [p for p in model.adapters.values() if isinstance(p, RoutedCrossAttnProcessor)]
    self_attn = [p for p in model.adapters.values() if isinstance(p, RoutedReferenceAttnProcessor)]
    counts = {
        "unet": _base_count(model.unet),
        "referencenet": _count(model.referencenet.parameters()),
        "referencenet_trainable": _count(p for n, p in model.referencenet.unet.named_parameters()
                                         if n not in model.referencenet.dead_parameter_names()),
        "subject_qformer": _count(model.subject_qformer.parameters()),
        "routing_qformer": _count(model.routing_qformer.parameters()),
        "routers": _count(p for proc in cross for p in proc.router.parameters()),
        "new_kv_cross_attention": _count(p for proc in cross for p in (*proc.to_k.parameters(), *proc.to_v.parameters())),
        "new_kv_self_attention": _count(p for proc in self_attn if proc.uses_reference
                                        for p in (*proc.to_k.parameters(), *proc.to_v.parameters())),
        "image_encoder": _count(model.image_encoder.parameters()),
        "vae": _count(components.vae.parameters()),
        "text_encoders": _count(components.text_encoder.parameters()) + _count(components.text_encoder_2.parameters()),
    }
    return {
        "preset": config.preset,
        "cross_attention_layers": len(cross),
        "referencenet_tapped_layers": len(model.referencenet.tapped),
        "parameters": counts,
        "parameters_billions": {k: round(v / 1e9, 3) for k, v in counts.items()},
        "stage1_trainable": _count(model.stage1_parameters().values()),
        "stage2_trainable": _count(model.stage2_parameters().values()),
    }
