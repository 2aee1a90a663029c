"""The two training stages over one shared base (paper Section 3): stage 1 trains the subject
encoder (subject QFormer, ReferenceNet, new K/V) with the diffusion loss on one subject per sample
and no router; stage 2 freezes it and trains the router with diffusion + 0.1 x routing loss."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from anystory.components import SDXL_SCHEDULER, BaseComponents, build_random, load_pretrained
from anystory.config import AnyStoryConfig
from anystory.context import ReferenceEncoding
from anystory.export import load_adapter_weights
from anystory.losses import routing_loss
from anystory.model import AnyStoryModel
from anystory.presets import get_preset
from training import validation
from training.conditions import Conditions, encode_conditions
from training.diffusion import diffusion_step
from training.fsdp import clip_sharded_grad_norm_, prepare_fsdp, shard_stage1
from training.optim import build_optimizer, check_optimizer_available, check_optimizer_name, lr_schedule
from training.text import TextEncoder

STAGES = (1, 2)


class ModelArgsError(ValueError):
    """A model.init_args value out of its range; the message names the key."""


def check_model_args(args: Mapping[str, Any]) -> None:
    """The hyper-parameters that can be wrong on their own, checked before any model is built: by
    `python -m training` before it instantiates the module (one line), and by the module itself."""
    try:
        check_optimizer_name(args.get("optimizer", "adamw"))
    except ValueError as err:
        raise ModelArgsError(str(err)) from None
    snr_gamma = args.get("snr_gamma")
    if snr_gamma is not None and snr_gamma <= 0:
        raise ModelArgsError(f"model.init_args.snr_gamma must be > 0 (or null), got {snr_gamma}")
    total = SDXL_SCHEDULER["num_train_timesteps"]
    low, high = args.get("min_timestep", 0), args.get("max_timestep")
    if not 0 <= low < (total if high is None else high) <= total:
        raise ModelArgsError(f"model.init_args.min_timestep={low} and max_timestep={high} must satisfy "
                             f"0 <= min_timestep < max_timestep <= {total}")


class AnyStoryModule(L.LightningModule):
    """Shared base: builds the model, encodes a batch, computes the diffusion loss, and keeps
    checkpoints to what AnyStory adds (the frozen base is rebuilt from the hyper-parameters):
    `on_save_checkpoint` trims the state_dict Lightning gathered (under any strategy) to the adapter
    tensors; loading is non-strict for the base (`strict_loading`) and strict for the adapters
    (`check_state`, a load_state_dict pre-hook, so every strategy's load path runs it)."""

    stage: int = 0

    def __init__(
        self,
        preset: str = "tiny",
        weights: dict[str, str | None] | None = None,
        base_dir: str | None = None,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        lr_decay: str = "constant",  # or "cosine": to 0 at trainer.max_steps (short runs at a high lr)
        routing_weight: float = 0.1,
        coarse_routing_weight: float = 0.5,  # the coarse map drives the masked attention: supervise it too
        snr_gamma: float | None = None,  # min-SNR-gamma loss weights (5.0 is the usual value); None: plain loss
        debiased_estimation: bool = False,  # 1 / sqrt(SNR) loss weights (kohya's debiased_estimation_loss)
        noise_offset: float = 0.0,  # x a per-channel normal draw added to the noise (0.05-0.1 is usual)
        min_timestep: int = 0,  # training timesteps are drawn from [min_timestep, max_timestep) (kohya's names)
        max_timestep: int | None = None,  # None: the schedule's end (1000)
        optimizer: str = "adamw",  # or "adamw8bit" (bitsandbytes, CUDA)
        gradient_checkpointing: bool = False,
        frozen_dtype: str = "float32",
        val_timesteps: list[int] | None = None,
        seed: int = 0,
        tokenizer_dir: str = ".cache/anystory-tokenizer",
    ) -> None:
        super().__init__()
        if self.stage not in STAGES:
            raise TypeError("use Stage1Module or Stage2Module")
        self.save_hyperparameters()
        check_model_args(self.hparams)
        self.model: AnyStoryModel | None = None
        self.adapter_meta: dict[str, torch.Tensor] = {}  # adapter keys and shapes, on the meta device
        self.rejected: Counter = Counter()
        self.strict_loading = False  # the checkpoint has no base tensors: missing keys are expected
        self.register_load_state_dict_pre_hook(self._check_loaded_state)

    # ----- model -----
    def build_components(self) -> BaseComponents:
        hp = self.hparams
        config = get_preset(hp.preset)
        dtype = getattr(torch, hp.frozen_dtype)
        if hp.base_dir:
            config.weights = {"base": hp.base_dir, "image_encoder": str(Path(hp.base_dir) / "image_encoder")}
            return load_pretrained(config, torch_dtype=dtype)
        if hp.weights:
            config.weights = dict(hp.weights)
            return load_pretrained(config, torch_dtype=dtype)
        if hp.preset != "tiny":
            raise ValueError(f"preset {hp.preset!r} needs `weights` (base, image_encoder) or `base_dir`")
        return build_random(config, hp.tokenizer_dir, seed=hp.seed)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.frozen_dtype != "float32" and self._trainer is not None and "mixed" not in str(self.trainer.precision):
            raise ValueError(f"frozen_dtype={hp.frozen_dtype} needs mixed precision (trainer.precision: bf16-mixed): "
                             "the trained parts stay float32")
        fsdp = self.trainer.strategy if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy) else None
        if fsdp is not None:
            prepare_fsdp(fsdp, self.stage)  # before the base is built: minutes for SDXL
        components = self.build_components()
        config = self.model_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.model = AnyStoryModel(config, components.unet, components.image_encoder)
        if hp.init_from:
            load_adapter_weights(self.model, Path(hp.init_from) / "anystory.safetensors", self.init_keys())
        self.vae = components.vae.requires_grad_(False)
        self.text_encoder = components.text_encoder.requires_grad_(False)
        self.text_encoder_2 = components.text_encoder_2.requires_grad_(False)
        self.components = components
        self.encode_text = TextEncoder(components)
        self.noise_scheduler = DDPMScheduler(**SDXL_SCHEDULER)
        self.trainable = self.model.set_stage(self.stage)
        self.adapter_meta = {k: torch.empty_like(v, device="meta") for k, v in self.model.adapter_state_dict().items()}
        if hp.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            self.model.referencenet.unet.enable_gradient_checkpointing()
        if fsdp is not None:
            self.to(fsdp.root_device)  # the frozen parts, replicated: FSDP places only what it wraps
            shard_stage1(self.model, fsdp.root_device)

    def model_config(self) -> AnyStoryConfig:
        """The config the model (and its export) carries: the preset, and where its base comes from."""
        config = get_preset(self.hparams.preset)
        config.weights = dict(self.hparams.weights or {})
        return config

    def init_keys(self) -> set[str] | None:
        """What `init_from` loads: everything (stage 1), or all but the stage-2 set (stage 2 starts its
        routers afresh, so their shape may differ from the stage-1 export's untrained ones)."""
        if self.stage == 1:
            return None
        return set(self.model.adapter_state_dict()) - set(self.model.stage2_parameters())

    # ----- checkpoints: AnyStory's tensors only -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning's state_dict holds the frozen base too (references, not copies). Under FSDP's
        # rank-0 full state dict the other ranks hold none of the sharded tensors: keep what is there.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: state[key] for key in (f"model.{k}" for k in self.adapter_meta) if key in state}

    def _check_loaded_state(self, module: torch.nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                            *args: Any) -> None:
        """Before any tensor is copied: the checkpoint has exactly the adapter tensors, or one line says
        which keys differ (a non-strict load alone would skip them silently). The model is built first
        where no Trainer did (LightningModule.load_from_checkpoint); torch loads the children after
        this hook, so they are the built ones."""
        self.configure_model()
        check_state(self.adapter_meta, {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})

    def setup(self, stage: str) -> None:
        # Before the model is built (minutes for SDXL): an optimizer whose package is missing.
        if stage == "fit":
            check_optimizer_available(self.hparams.optimizer)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Settled on the host, before the batch reaches the device: whether any subject is
        # padding. The routed layers then skip the padding masks without reading the GPU.
        if isinstance(batch, dict) and isinstance(batch.get("valid"), torch.Tensor):
            batch["all_valid"] = bool(batch["valid"].all())
        return batch

    # ----- batch -> model inputs -----
    def conditions(self, batch: dict[str, Any], sample_latents: bool) -> Conditions:
        return encode_conditions(self.vae, self.encode_text, batch, self.device, sample_latents)

    def run_model(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditions, refs: ReferenceEncoding,
                  **kwargs: Any):
        return self.model(noisy, timesteps, cond.embeds, cond.added, refs, router=self.stage == 2, **kwargs)

    # ----- training -----
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.count_rejections(batch)
        cond = self.conditions(batch, sample_latents=True)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, dict]:
            out = self.run_model(noisy, timesteps, cond, self.model.encode_references(cond.subjects))
            return out.noise_pred, out.routing

        loss, routing = diffusion_step(self.noise_scheduler, cond.latents, predict, self.hparams.noise_offset,
                                       self.hparams.snr_gamma, (self.hparams.min_timestep, self.hparams.max_timestep),
                                       self.hparams.debiased_estimation)
        logs = {"train/loss_diffusion": loss.detach()}
        if self.stage == 2:
            route, by_size = routing_loss(routing, batch["masks"], batch["valid"], self.hparams.coarse_routing_weight)
            loss = loss + self.hparams.routing_weight * route
            logs["train/loss_routing"] = route.detach()
            logs.update({f"train/loss_routing_{h}x{w}": v.detach() for (h, w), v in by_size.items()})
        logs["train/loss"] = loss.detach()
        batch_size = len(batch["caption"])  # cached batches hold no pixels
        self.log_dict(logs, prog_bar=False, batch_size=batch_size)
        self.log("train/loss_total", loss.detach(), prog_bar=True, batch_size=batch_size, logger=False)
        return loss

    def count_rejections(self, batch: dict[str, Any]) -> None:
        self.rejected.update(batch.get("rejected") or {})
        # A running total: its epoch aggregate is the largest value, not a sum.
        self.log("data/rejected", float(sum(self.rejected.values())), batch_size=1, reduce_fx="max")

    # ----- validation: the condition gain, and the router's mIoU in stage 2 -----
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The evaluation's own function and noise (seeded per sample): what W&B shows here is what
        # training.evaluate writes to metrics/eval_details.json for the same checkpoint and data.
        timesteps = self.hparams.val_timesteps or validation.TIMESTEPS
        # Conditions and references once per batch; only the noise level changes inside.
        cond = self.conditions(batch, sample_latents=False)
        refs = self.model.encode_references(cond.subjects)
        metrics = validation.batch_metrics(self.model, self.noise_scheduler, self.vae, cond, refs, batch, timesteps,
                                           validation.validation_variants(router=self.stage == 2))
        validation.log_batch(self.log, metrics, validation.validation_logs(timesteps))

    def configure_optimizers(self):
        params = [p for p in self.trainable.values() if p.requires_grad]
        optimizer = build_optimizer(self.hparams.optimizer, params, self.hparams.lr, self.hparams.weight_decay,
                                    self.device)
        total = self.trainer.max_steps if self._trainer is not None else -1
        schedule = lr_schedule(optimizer, self.hparams.lr_decay, self.hparams.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it must not clip the
        # fp16 GradScaler's scaled gradients, which a fused step unscales itself). Without a scaler
        # (bf16-mixed, 32-true) the gradients are the true ones and clipping them is exact, as
        # Lightning's own path does for other optimizers. Sharded strategies keep Lightning's path.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP plugin refuses norm clipping (it would need a root FSDP module, which
            # this partial wrapping has not); the shards' norm is reduced over the ranks instead.
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":  # element-wise: exact on each rank's shards
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            else:
                clip_sharded_grad_norm_(params, gradient_clip_val, self.device)
            return
        if (gradient_clip_val and scaler is None
                and isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def check_state(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> None:
    """A checkpoint's `model.`-prefixed tensors against the model's adapter tensors (`expected`,
    possibly on the meta device): the same keys, each of the same shape, or an error naming them."""
    want = {f"model.{k}": v for k, v in expected.items()}
    missing, unexpected = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state_dict.items():
        if want[key].shape != value.shape:
            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want[key].shape)}")


class Stage1Module(AnyStoryModule):
    """Subject encoder: subject QFormer, ReferenceNet, new K/V; diffusion loss; no router."""

    stage = 1


class Stage2Module(AnyStoryModule):
    """Router: routing QFormer and per-layer routers; diffusion + routing loss; encoder frozen."""

    stage = 2
