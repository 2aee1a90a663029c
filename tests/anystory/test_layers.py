from __future__ import annotations

import pytest
from diffusers.models.attention import BasicTransformerBlock

from anystory.layers import layer_hw, transformer_block_names
from tests.anystory.helpers import unet_inputs


def test_block_names_follow_the_forward_order(components, tiny_config):
    unet = components.unet
    called: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: called.append(name))
        for name, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock)
    ]
    inputs = unet_inputs(tiny_config, batch=1)
    unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
         added_cond_kwargs=inputs["added_cond_kwargs"])
    for h in handles:
        h.remove()
    names = transformer_block_names(unet)
    assert names == called
    # named_modules() lists up_blocks before mid_block: the sort must not follow it.
    registration = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    assert registration != names


@pytest.mark.parametrize(
    ("tokens", "latent", "expected"),
    [(256, (16, 16), (16, 16)), (64, (16, 16), (8, 8)), (16, (16, 16), (4, 4)), (24, (7, 11), (4, 6)), (6, (7, 11), (2, 3)), (77, (16, 16), None)],
)
def test_layer_hw(tokens, latent, expected):
    if expected is None:
        with pytest.raises(ValueError):
            layer_hw(tokens, latent)
    else:
        assert layer_hw(tokens, latent) == expected
