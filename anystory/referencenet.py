"""The simplified ReferenceNet (Eq. 3, Table 1): a copy of the UNet without cross-attention
(attn2 and norm2 removed from every transformer block), a fifth input channel for the subject mask
(zero-initialised), run once at t = 0 with zero added conditions. It banks the input of the
self-attention (the norm1 output) of blocks 2..L, keyed by the block names of the denoising UNet."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from anystory.layers import transformer_block_names
from anystory.processors import self_attention


class BankWriterProcessor:
    """Self-attention of a ReferenceNet block that also stores its input in the call's bank."""

    def __init__(self, block_name: str, tap: bool) -> None:
        self.block_name = block_name
        self.tap = tap

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        bank: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if bank is not None and self.tap:
            bank[self.block_name] = hidden_states
        return self_attention(attn, hidden_states)


def _strip_cross_attention(unet: UNet2DConditionModel) -> None:
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.attn2 = None
            module.norm2 = None


class ReferenceNet(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, ref_size: int) -> None:
        """Build from the (frozen, pretrained) denoising UNet: same weights, minus cross-attention."""
        super().__init__()
        config = dict(unet.config)
        config["in_channels"] = unet.config.in_channels + 1
        # Built in float32 whatever the frozen UNet's dtype: the ReferenceNet is trained in stage 1.
        with torch.device(unet.conv_in.weight.device):
            self.unet = UNet2DConditionModel.from_config(config)
        _strip_cross_attention(self.unet)
        self.ref_size = ref_size
        self.block_names = transformer_block_names(self.unet)
        self.tapped = self.block_names[1:]  # G_2..G_L (paper Section 1.3)
        self._load_from(unet)
        self.unet.set_attn_processor(self._processors())

    def _load_from(self, unet: UNet2DConditionModel) -> None:
        own = self.unet.state_dict()
        source = {k: v for k, v in unet.state_dict().items() if k in own and k != "conv_in.weight"}
        dropped = sorted(set(unet.state_dict()) - set(source) - {"conv_in.weight"})
        not_cross = [k for k in dropped if ".attn2." not in k and ".norm2." not in k]
        if not_cross or set(own) - set(source) != {"conv_in.weight"}:
            raise RuntimeError(f"ReferenceNet/UNet layouts disagree: {not_cross[:5]}")
        if unet.conv_in.weight.device.type != "meta":
            weight = torch.zeros_like(own["conv_in.weight"])
            weight[:, : unet.config.in_channels] = unet.conv_in.weight.detach().to(weight.dtype)
            source["conv_in.weight"] = weight  # mask channel zero-initialised
            self.unet.load_state_dict(source, strict=True)

    def _processors(self) -> dict[str, BankWriterProcessor]:
        processors = {}
        for name in self.unet.attn_processors:
            block = name.rsplit(".attn1.processor", 1)[0]
            processors[name] = BankWriterProcessor(block, tap=block in self.tapped)
        return processors

    @property
    def pooled_dim(self) -> int:
        config = self.unet.config
        return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def forward(self, ref_latents: torch.Tensor, ref_masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """ref_latents (M, 4, h, w) VAE latents of segmented references, ref_masks (M, 1, h, w) at
        latent size -> {block name: (M, tokens, dim)} for blocks 2..L."""
        batch = ref_latents.shape[0]
        size = self.ref_size
        time_ids = ref_latents.new_tensor([size, size, 0, 0, size, size]).expand(batch, 6)
        bank: dict[str, torch.Tensor] = {}
        self.unet(
            torch.cat([ref_latents, ref_masks.to(ref_latents.dtype)], dim=1),
            timestep=torch.zeros(batch, device=ref_latents.device),
            encoder_hidden_states=ref_latents.new_zeros(batch, 1, self.unet.config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": ref_latents.new_zeros(batch, self.pooled_dim), "time_ids": time_ids},
            cross_attention_kwargs={"bank": bank},
        )
        missing = set(self.tapped) - set(bank)
        if missing:
            raise RuntimeError(f"ReferenceNet wrote no features for {sorted(missing)[:3]}")
        return bank

    def dead_parameter_names(self) -> set[str]:
        """Parameters that run after the last tapped input and so never receive a gradient: the
        last block's attn1 / norm3 / ff, its Transformer2D's proj_out, the rest of that up block
        and everything after it. Excluded from the trainable set (no DDP unused-parameter search)."""
        last = self.tapped[-1]  # e.g. up_blocks.1.attentions.2.transformer_blocks.1
        parts = last.split(".")
        up_index, transformer = int(parts[1]), ".".join(parts[:4])
        dead_prefixes = [f"{last}.attn1.", f"{last}.norm3.", f"{last}.ff.", f"{transformer}.proj_out.",
                         f"up_blocks.{up_index}.upsamplers.", "conv_norm_out.", "conv_out."]
        dead_prefixes += [f"up_blocks.{i}." for i in range(up_index + 1, len(self.unet.up_blocks))]
        return {name for name, _ in self.unet.named_parameters() if name.startswith(tuple(dead_prefixes))}
