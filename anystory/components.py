"""The frozen base components (SDXL-shaped UNet, VAE, two text encoders with tokenizers, CLIP image
encoder, scheduler), built from a config with random weights, on the meta device, or loaded from
the paths / hub ids that the user gives in `config.weights`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from anystory.config import AnyStoryConfig
from anystory.tokenizer import build_clip_tokenizer

# SDXL's scheduler settings; sampling uses Karras sigmas (paper.md Section 8, item 29).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)

WEIGHT_KEYS = ("base", "unet", "image_encoder")


@dataclass
class BaseComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    image_encoder: CLIPVisionModelWithProjection
    scheduler: EulerDiscreteScheduler


def sdxl_pipeline(components: BaseComponents, unet: UNet2DConditionModel | None = None) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline over these components (references, not copies): its prompt encoding
    and sampling loop serve training and inference alike."""
    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet or components.unet,
        scheduler=components.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(use_karras_sigmas: bool = True) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SDXL_SCHEDULER, use_karras_sigmas=use_karras_sigmas)


def build_random(config: AnyStoryConfig, tokenizer_dir: str | Path, seed: int = 0,
                 device: str | torch.device = "cpu") -> BaseComponents:
    """Random-weight components from the config (tests, toy chain, `inspect` on the meta device).

    On the meta device nothing is allocated, which is how the `sdxl` shapes are inspected."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config.unet)
        vae = AutoencoderKL.from_config(config.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_encoder_2))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config.image_encoder))
    return BaseComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        tokenizer_2=build_clip_tokenizer(tokenizer_dir, pad_token="!"),
        image_encoder=image_encoder,
        scheduler=make_scheduler(),
    )


def _require(weights: dict[str, str], key: str) -> str:
    value = weights.get(key)
    if not value:
        raise ValueError(
            f"weights.{key} is not set: give a local path or a hub id already in the local cache "
            f"(nothing is downloaded at run time)"
        )
    return value


def _load(loader, source: str, key: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"weights.{key} = {source!r} could not be loaded: {err}") from err


def load_pretrained(config: AnyStoryConfig, torch_dtype: torch.dtype = torch.float32) -> BaseComponents:
    """Load the frozen components from `config.weights`: `base` (an SDXL diffusers folder or hub
    id), optional `unet` (e.g. RealVisXL's UNet for inference) and `image_encoder` (CLIP ViT-H/14
    in transformers layout). A missing or unreadable source is an error that names its key."""
    weights = config.weights
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"unknown weights keys {unknown}; known: {list(WEIGHT_KEYS)}")
    base = _require(weights, "base")
    image_encoder_src = _require(weights, "image_encoder")
    unet_src = weights.get("unet") or base
    unet_kwargs = {"subfolder": "unet"} if unet_src == base else {}
    return BaseComponents(
        unet=_load(UNet2DConditionModel.from_pretrained, unet_src, "unet" if unet_src != base else "base",
                   torch_dtype=torch_dtype, **unet_kwargs),
        vae=_load(AutoencoderKL.from_pretrained, base, "base", subfolder="vae", torch_dtype=torch_dtype),
        text_encoder=_load(CLIPTextModel.from_pretrained, base, "base", subfolder="text_encoder",
                           dtype=torch_dtype),
        text_encoder_2=_load(CLIPTextModelWithProjection.from_pretrained, base, "base",
                             subfolder="text_encoder_2", dtype=torch_dtype),
        tokenizer=_load(CLIPTokenizer.from_pretrained, base, "base", subfolder="tokenizer"),
        tokenizer_2=_load(CLIPTokenizer.from_pretrained, base, "base", subfolder="tokenizer_2"),
        image_encoder=_load(CLIPVisionModelWithProjection.from_pretrained, image_encoder_src,
                            "image_encoder", dtype=torch_dtype),
        scheduler=make_scheduler(),
    )


def save_components(components: BaseComponents, directory: str | Path) -> None:
    """Write the components in the diffusers / transformers folder layout (safetensors), the
    layout that `load_pretrained` reads back as `weights.base` and `weights.image_encoder`.
    The UNet is written without any installed AnyStory processors: those belong to the export."""
    directory = Path(directory)
    installed = components.unet.attn_processors
    components.unet.set_attn_processor(AttnProcessor2_0())
    try:
        components.unet.save_pretrained(directory / "unet")
    finally:
        components.unet.set_attn_processor(installed)
    components.vae.save_pretrained(directory / "vae")
    components.text_encoder.save_pretrained(directory / "text_encoder")
    components.text_encoder_2.save_pretrained(directory / "text_encoder_2")
    components.tokenizer.save_pretrained(directory / "tokenizer")
    components.tokenizer_2.save_pretrained(directory / "tokenizer_2")
    components.image_encoder.save_pretrained(directory / "image_encoder")
    components.scheduler.save_pretrained(directory / "scheduler")
