"""Inference: prompt + N (reference image, mask) pairs -> image, on diffusers' SDXL pipeline.
The references are encoded once per call (CLIP + QFormers + ReferenceNet) and the encoding is
shared by every step and both CFG branches through the routing context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from anystory.components import BaseComponents, sdxl_pipeline
from anystory.context import LayerRouting, ReferenceEncoding
from anystory.model import AnyStoryModel
from anystory.preprocess import encode_subjects, prepare_reference
from anystory.visualize import routing_panel, to_cpu


@dataclass
class GenerationResult:
    images: list[Image.Image]
    # (step index, timestep, maps of the conditional branch) per recorded step
    routing: list[tuple[int, int, dict[int, LayerRouting]]] = field(default_factory=list)

    def routing_picture(self, image_index: int = 0, max_rows: int = 6) -> Image.Image:
        chosen = self.routing
        if len(chosen) > max_rows:
            idx = torch.linspace(0, len(chosen) - 1, max_rows).round().long().tolist()
            chosen = [chosen[i] for i in idx]
        return routing_panel(self.images[image_index], [(t, maps) for _, t, maps in chosen], sample=image_index)


class AnyStoryPipeline:
    """`compile=True` (opt-in) runs the routed UNet through `torch.compile(fullgraph=True)` with
    static shapes; on CUDA with CUDA graphs (`mode="reduce-overhead"`), which removes the per-kernel
    launch cost of the routed layers. The first call of each shape compiles (tens of seconds at
    SDXL size); later calls with the same size, subject count and switches reuse the graphs.
    `compile_options` override torch.compile's arguments (e.g. `{"backend": "aot_eager"}`)."""

    def __init__(self, model: AnyStoryModel, components: BaseComponents, compile: bool = False,
                 compile_options: dict | None = None) -> None:
        self.model = model.eval()
        self.components = components
        self.sdxl = sdxl_pipeline(components, unet=model.unet)
        if compile:
            cuda = model.unet.device.type == "cuda"
            options = {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead" if cuda else None,
                       **(compile_options or {})}
            self.sdxl.unet = torch.compile(model.unet, **options)

    @property
    def device(self) -> torch.device:
        return self.model.unet.device

    @torch.no_grad()
    def encode(self, subjects: list[tuple[Image.Image, Image.Image | None]]) -> ReferenceEncoding:
        """Encode N references (image, mask or None for an alpha channel) as one sample."""
        if not subjects:
            raise ValueError("give at least one subject (reference image and mask)")
        cfg = self.model.config
        tensors = [prepare_reference(img, mask, cfg.clip_image_size, cfg.ref_size) for img, mask in subjects]
        clip, ref, mask = (torch.stack([t[i] for t in tensors])[None].to(self.device) for i in range(3))
        valid = torch.ones(1, len(subjects), dtype=torch.bool, device=self.device)
        batch = encode_subjects(self.components.vae, clip.to(self.model.unet.dtype), ref, mask, valid, all_valid=True)
        return self.model.encode_references(batch)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subjects: list[tuple[Image.Image, Image.Image | None]],
        **kwargs,
    ) -> GenerationResult:
        """Generate from a prompt and N references (image, mask or None for an alpha channel).
        Keyword arguments are those of `generate`."""
        return self.generate(prompt, self.encode(subjects), **kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        refs: ReferenceEncoding,
        negative_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        gamma: float | None = None,
        router: bool = True,
        record_routing: bool = False,
        cache_reference_kv: bool = True,
        step_callback: Callable[..., dict] | None = None,
        subject_attention: bool = True,
        reference_attention: bool = True,
        given_routes: Callable[[tuple[int, int]], torch.Tensor] | None = None,
    ) -> GenerationResult:
        """Generate from an encoding of one sample's references (batch size 1). What depends only on
        the call (the references' and the prompt's projected K/V, the routers' per-route factors) is
        computed at the first step and reused (`cache_reference_kv`). `step_callback` is diffusers'
        `callback_on_step_end(pipe, step, timestep, kwargs) -> kwargs`. `subject_attention` /
        `reference_attention` switch the CLIP / ReferenceNet path off (the paper's ablations);
        `given_routes(hw) -> (1, h * w, N + 1)` replaces the routers (e.g. ground-truth routes)."""
        if refs.valid.shape[0] != 1:
            raise ValueError("generate takes the references of one sample; encode them with `encode`")
        size = self.model.config.resolution
        height, width = height or size, width or size
        refs = refs.repeat(num_images_per_prompt)
        cfg_on = guidance_scale > 1.0
        ctx = self.model.context(
            refs.for_cfg() if cfg_on else refs,
            (height // self.sdxl.vae_scale_factor, width // self.sdxl.vae_scale_factor),
            router=router, sampling="argmax", eta=eta, gamma=gamma, cache_reference_kv=cache_reference_kv,
            subject_attention=subject_attention, reference_attention=reference_attention,
        )
        if given_routes is not None:  # one sample's routes for every row (images per prompt, CFG branches)
            rows = num_images_per_prompt * (2 if cfg_on else 1)
            ctx.given_routes = lambda hw: given_routes(hw).expand(rows, -1, -1)
        recorded: list[tuple[int, int, dict[int, LayerRouting]]] = []
        cond_rows = slice(num_images_per_prompt, None) if cfg_on else slice(None)

        def keep_maps(pipe, step: int, timestep, kwargs):  # diffusers' step-end callback
            if record_routing and ctx.maps:
                recorded.append((step, int(timestep), to_cpu(ctx.maps, cond_rows)))
            return kwargs if step_callback is None else step_callback(pipe, step, timestep, kwargs)

        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = self.sdxl(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            cross_attention_kwargs={"anystory": ctx},
            callback_on_step_end=keep_maps,
        ).images
        return GenerationResult(images=images, routing=recorded)
