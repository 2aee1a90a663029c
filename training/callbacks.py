"""Callbacks: sample images with their routing maps for fixed validation references, and training
throughput. Both log through the Trainer's loggers (W&B offline by default)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from anystory.pipeline import AnyStoryPipeline
from anystory.preprocess import encode_subjects
from anystory.visualize import routing_panel


class Throughput(L.Callback):
    """Training samples per second, averaged over the last `window` steps of this rank."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._times = (self._times + [time.perf_counter()])[-(self.window + 1):]
        if len(self._times) > 1:
            rate = len(batch["caption"]) * (len(self._times) - 1) / (self._times[-1] - self._times[0])
            module.log("train/samples_per_s", rate, batch_size=1)


def reference_cutouts(batch: dict[str, Any], i: int) -> list[Image.Image | None]:
    """Sample i's references as RGBA cut-outs (the ReferenceNet input: [-1, 1] pixels, mask as
    alpha); None for an empty subject slot."""
    out: list[Image.Image | None] = []
    for ref, mask, valid in zip(batch["ref_pixels"][i], batch["ref_masks"][i], batch["valid"][i], strict=True):
        if not valid:
            out.append(None)
            continue
        rgb = ((ref.float().cpu() + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
        alpha = (mask.float().cpu()[0] * 255).round().byte().numpy()
        out.append(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"))
    return out


def beside(references: list[Image.Image | None], image: Image.Image) -> Image.Image:
    """The references (on white, at the image's height) left of the image; an empty slot stays
    white, so that every sample of a batch gives a picture of one size."""
    side = image.height
    out = Image.new("RGB", (side * len(references) + image.width, side), (255, 255, 255))
    for k, ref in enumerate(references):
        if ref is not None:
            rgba = ref.resize((side, side))
            out.paste(rgba.convert("RGB"), (k * side, 0), rgba)
    out.paste(image.convert("RGB"), (side * len(references), 0))
    return out


class SampleImages(L.Callback):
    """Every `every_n_steps`, generate for the first `num_samples` validation samples (their
    references and captions, fixed seeds) and log, at the trainer's global step, each image with
    its references beside it and (stage 2) its routing-map panel, whose legend shows them too."""

    def __init__(self, every_n_steps: int = 500, num_samples: int = 2, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self._batch: dict[str, Any] | None = None

    def _references(self, trainer: L.Trainer) -> dict[str, Any] | None:
        if self._batch is None and trainer.datamodule is not None:
            loader = trainer.datamodule.val_dataloader()
            self._batch = next(iter(loader), None) if loader else None
        return self._batch

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        refs_batch = self._references(trainer)
        if refs_batch is None:
            return
        self.log_samples(trainer, module, refs_batch, step)

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, module: L.LightningModule, batch: dict[str, Any], step: int) -> None:
        was_training = module.model.training
        pipe = AnyStoryPipeline(module.model, module.components)
        images, panels, captions = [], [], []
        for i in range(min(self.num_samples, batch["pixels"].shape[0])):
            rows = slice(i, i + 1)
            subjects = encode_subjects(
                module.vae, batch["clip_pixels"][rows].to(module.device), batch["ref_pixels"][rows].to(module.device),
                batch["ref_masks"][rows].to(module.device), batch["valid"][rows].to(module.device),
            )
            refs = module.model.encode_references(subjects)
            result = pipe.generate(batch["caption"][i], refs, num_inference_steps=self.num_inference_steps,
                                   guidance_scale=self.guidance_scale, seed=i, router=module.stage == 2,
                                   record_routing=module.stage == 2)
            references = reference_cutouts(batch, i)
            images.append(beside(references, result.images[0]))
            captions.append(batch["caption"][i])
            if result.routing:
                steps = [(timestep, maps) for _, timestep, maps in result.routing]
                panels.append(routing_panel(result.images[0], steps, references=references))
        module.model.train(was_training)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/images", images, step=step, caption=captions)
                if panels:
                    logger.log_image("samples/routing_maps", panels, step=step, caption=captions)
