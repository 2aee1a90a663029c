"""AnyStoryModel: the frozen UNet patched with routed attention processors, the simplified
ReferenceNet, the subject and routing QFormers over a frozen CLIP image encoder. This is the
training API that `training/` drives, and what the inference pipeline wraps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPVisionModelWithProjection

from anystory.config import AnyStoryConfig
from anystory.context import LayerRouting, ReferenceEncoding, RoutingContext
from anystory.layers import adapter_key, transformer_block_names
from anystory.processors import RoutedCrossAttnProcessor, RoutedReferenceAttnProcessor
from anystory.qformer import QFormer
from anystory.referencenet import ReferenceNet


@dataclass
class Subjects:
    """A batch of reference subjects, padded to N per sample.

    clip_pixels: (B, N, 3, S, S) CLIP-normalised, background already zero (the encoder's zero);
                 None when `clip_tokens` are given
    ref_latents: (B, N, 4, h, w) scaled VAE latents of the segmented references
    ref_masks:   (B, N, 1, h, w) subject masks at latent size, in {0, 1}
    valid:       (B, N) bool; False marks padding
    drop:        (B,) bool or None; True replaces the sample's subject tokens by the null tokens
                 (the 10% CLIP-condition drop of training)
    all_valid:   whether no subject is padding, when the host knows it without reading `valid` back
                 from the device (then the layers skip the padding masks); None: unknown
    clip_tokens: (B, N, T, C) the image encoder's tokens of `clip_pixels`, and null_clip_tokens (T, C)
                 those of the zero image, when computed beforehand (training's encoder cache); then
                 the image encoder does not run
    """

    clip_pixels: torch.Tensor | None
    ref_latents: torch.Tensor
    ref_masks: torch.Tensor
    valid: torch.Tensor
    drop: torch.Tensor | None = None
    all_valid: bool | None = None
    clip_tokens: torch.Tensor | None = None
    null_clip_tokens: torch.Tensor | None = None


@dataclass
class AnyStoryOutput:
    noise_pred: torch.Tensor
    routing: dict[int, LayerRouting]  # layer index -> maps (empty when the router is off)


@torch.no_grad()
def clip_tokens(image_encoder: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    """(M, 3, S, S) CLIP pixels -> the penultimate layer's tokens, (M, 257, 1280) for ViT-H/14."""
    hidden = image_encoder(pixels.to(image_encoder.dtype), output_hidden_states=True)
    return hidden.hidden_states[-2]


class AnyStoryModel(nn.Module):
    def __init__(
        self, config: AnyStoryConfig, unet: UNet2DConditionModel, image_encoder: CLIPVisionModelWithProjection
    ) -> None:
        super().__init__()
        self.config = config
        self.unet = unet.requires_grad_(False)
        self.image_encoder = image_encoder.requires_grad_(False)
        self.referencenet = ReferenceNet(unet, config.ref_size)
        device = unet.conv_in.weight.device
        with torch.device(device):
            self.subject_qformer = QFormer(config.subject_qformer)
            self.routing_qformer = QFormer(config.routing_qformer)
        self.block_names = transformer_block_names(unet)
        self.layer_of = {name: i for i, name in enumerate(self.block_names)}
        self.adapters = nn.ModuleDict()
        processors = {}
        modules = dict(unet.named_modules())
        for index, block in enumerate(self.block_names):
            attn1, attn2 = modules[f"{block}.attn1"], modules[f"{block}.attn2"]
            self_proc = RoutedReferenceAttnProcessor(attn1, index, block)
            cross_proc = RoutedCrossAttnProcessor(attn2, index, config.router)
            processors[f"{block}.attn1.processor"] = self_proc
            processors[f"{block}.attn2.processor"] = cross_proc
            self.adapters[adapter_key(f"{block}.attn1")] = self_proc
            self.adapters[adapter_key(f"{block}.attn2")] = cross_proc
        unet.set_attn_processor(processors)
        # The bank is keyed by the denoising UNet's block names: check the wiring one to one.
        if self.referencenet.tapped != self.block_names[1:]:
            raise RuntimeError("ReferenceNet blocks do not match the UNet's transformer blocks")

    # ----- parameter sets (paper Section 3) -----
    def stage1_parameters(self) -> dict[str, nn.Parameter]:
        """Subject QFormer, ReferenceNet (all parameters that can get a gradient), and the new K/V
        of cross-attention (Eq. 5) and self-attention (Eq. 6)."""
        params = {f"subject_qformer.{n}": p for n, p in self.subject_qformer.named_parameters()}
        dead = self.referencenet.dead_parameter_names()
        params.update({f"referencenet.unet.{n}": p for n, p in self.referencenet.unet.named_parameters()
                       if n not in dead})
        for key, proc in self.adapters.items():
            for n, p in proc.named_parameters():
                if n.split(".")[0] in ("to_k", "to_v"):
                    params[f"adapters.{key}.{n}"] = p
        return params

    def stage2_parameters(self) -> dict[str, nn.Parameter]:
        """Routing QFormer and the per-layer routers."""
        params = {f"routing_qformer.{n}": p for n, p in self.routing_qformer.named_parameters()}
        for key, proc in self.adapters.items():
            if isinstance(proc, RoutedCrossAttnProcessor):
                params.update({f"adapters.{key}.router.{n}": p for n, p in proc.router.named_parameters()})
        return params

    def set_stage(self, stage: int) -> dict[str, nn.Parameter]:
        """Freeze everything, then unfreeze the stage's set; returns it."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.requires_grad_(False)
        params = self.stage1_parameters() if stage == 1 else self.stage2_parameters()
        for p in params.values():
            p.requires_grad_(True)
        return params

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything AnyStory adds to the base model: what export writes."""
        state = {}
        for prefix, module in (("subject_qformer", self.subject_qformer), ("routing_qformer", self.routing_qformer),
                               ("referencenet", self.referencenet), ("adapters", self.adapters)):
            state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        return state

    # ----- encoders -----
    def encode_references(self, subjects: Subjects) -> ReferenceEncoding:
        b, n = subjects.valid.shape
        if subjects.clip_tokens is None:
            pixels = subjects.clip_pixels.flatten(0, 1)
            zero = torch.zeros_like(pixels[:1])  # the zero image: background route and CFG null
            clip = clip_tokens(self.image_encoder, torch.cat([pixels, zero]))
        else:
            clip = torch.cat([subjects.clip_tokens.flatten(0, 1), subjects.null_clip_tokens[None]])
        tokens = self.subject_qformer(clip)
        routes = self.routing_qformer(clip)[:, 0]
        subject_tokens, null_tokens = tokens[:-1].unflatten(0, (b, n)), tokens[-1:]
        routing, null_route = routes[:-1].unflatten(0, (b, n)), routes[-1:]
        if subjects.drop is not None:
            keep = (~subjects.drop).to(subject_tokens.dtype)[:, None, None, None]
            subject_tokens = subject_tokens * keep + null_tokens[None] * (1 - keep)
        bank = self.referencenet(subjects.ref_latents.flatten(0, 1), subjects.ref_masks.flatten(0, 1))
        return ReferenceEncoding(
            subject_tokens=torch.cat([subject_tokens, null_tokens[None].expand(b, -1, -1, -1)], dim=1),
            routing_features=torch.cat([routing, null_route[None].expand(b, -1, -1)], dim=1),
            bank={k: v.unflatten(0, (b, n)) for k, v in bank.items()},
            valid=subjects.valid.bool(),
            all_valid=subjects.all_valid,
        )

    # ----- denoising -----
    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        refs: ReferenceEncoding,
        router: bool = True,
        sampling: Literal["gumbel", "argmax"] | None = None,
        eta: float | None = None,
        gamma: float | None = None,
        subject_attention: bool = True,
        reference_attention: bool = True,
        given_routes: Callable[[tuple[int, int]], torch.Tensor] | None = None,
    ) -> AnyStoryOutput:
        """Noise prediction of the routed UNet and the routing maps of every layer.
        `sampling` defaults to Gumbel in training mode and argmax in eval mode; `given_routes`
        replaces the routers (see RoutingContext)."""
        ctx = self.context(refs, noisy_latents.shape[-2:], router=router, sampling=sampling, eta=eta,
                           gamma=gamma, subject_attention=subject_attention,
                           reference_attention=reference_attention)
        ctx.given_routes = given_routes
        noise_pred = self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={"anystory": ctx},
        ).sample
        return AnyStoryOutput(noise_pred=noise_pred, routing=ctx.maps)

    def context(self, refs: ReferenceEncoding, latent_hw: tuple[int, int] | torch.Size, router: bool = True,
                sampling: str | None = None, eta: float | None = None, gamma: float | None = None,
                subject_attention: bool = True, reference_attention: bool = True,
                cache_reference_kv: bool = False) -> RoutingContext:
        """`cache_reference_kv`: keep per-call values (reference and text K/V, the routers'
        per-route factors) across the forwards of this context: one generation call."""
        return RoutingContext(
            refs=refs,
            latent_hw=(int(latent_hw[0]), int(latent_hw[1])),
            router=router,
            sampling=sampling or ("gumbel" if self.training else "argmax"),
            eta=self.config.eta if eta is None else eta,
            gamma=self.config.gamma if gamma is None else gamma,
            subject_attention=subject_attention,
            reference_attention=reference_attention,
            cache={} if cache_reference_kv else None,
        )
