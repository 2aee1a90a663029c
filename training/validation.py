"""The validation metrics of one batch, computed by one function for both the training loop's
validation (`AnyStoryModule.validation_step`, logged to W&B and the CSV) and `training.evaluate`
(`metrics/eval.json`): the same noise (seeded per sample and timestep, so the batch size does not
matter), the same switches per variant, the same formulas.

Every metric is a per-sample (numerator, denominator) pair; a figure over many samples is
sum(numerators) / sum(denominators), which is what Lightning's weighted epoch mean of
`numerator / denominator` with batch_size = denominator gives too, and what `training.bootstrap`
resamples over images."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers import DDPMScheduler

from anystory.context import ReferenceEncoding
from anystory.losses import downsample_instance_masks, instance_routes, routing_iou
from anystory.model import AnyStoryModel
from training.conditions import Conditions, seeded_noise
from training.identity import BLENDED, OWN, Appearances, decide, region_colours

# The evaluation's timesteps; the training loop's validation uses them unless configured otherwise.
TIMESTEPS = (200, 500, 800)
# Switches of each variant (paper Figs. 3, 4, 6): the model's forward keywords.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": dict(router=True),
    "router_off": dict(router=False),
    "clip_only": dict(router=True, reference_attention=False),
    "referencenet_only": dict(router=True, subject_attention=False),
    "without_subject": dict(router=True, eta=0.0, reference_attention=False),
    "ground_truth_routes": dict(router=True),  # the instance masks' routes: a perfect router
}
REGIONS = ("all", "subjects", "background")

Pair = tuple[torch.Tensor, torch.Tensor]  # per-sample numerators and denominators, (B,) each


def validation_variants(router: bool) -> dict[str, dict[str, Any]]:
    """What the training loop validates: the model as trained (stage 1 has no router yet) and the
    model without its subject condition."""
    return {"full": dict(router=router), "without_subject": dict(VARIANTS["without_subject"], router=router)}


def sample_seed(key: str, t: int) -> int:
    """The noise seed of one sample at one timestep: from its key, so that any batching draws it alike."""
    return zlib.crc32(key.encode()) * 1000 + t


def sample_noise(latents: torch.Tensor, keys: list[str], t: int) -> torch.Tensor:
    return torch.cat([seeded_noise(latents[i : i + 1], sample_seed(k, t)) for i, k in enumerate(keys)])


def region_losses(noise_pred: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor,
                  valid: torch.Tensor) -> dict[str, Pair]:
    """Per-sample mean squared error over the whole latent, inside the subjects' masks (their union,
    area-downsampled to the latent size, as weights) and outside them."""
    err = (noise_pred.float() - noise.float()).pow(2).mean(1)  # (B, h, w)
    inside = downsample_instance_masks(masks, valid, tuple(err.shape[-2:])).sum(1).clamp(max=1.0)
    outside = 1.0 - inside
    one = torch.ones(err.shape[0], device=err.device)
    out = {"all": (err.mean((1, 2)), one)}
    for name, weight in (("subjects", inside), ("background", outside)):
        area = weight.sum((1, 2))
        has = (area > 0).float()
        out[name] = ((weight * err).sum((1, 2)) / area.clamp(min=1e-8) * has, has)
    return out


def predicted_x0(scheduler: DDPMScheduler, noisy: torch.Tensor, noise_pred: torch.Tensor, t: int) -> torch.Tensor:
    alpha = scheduler.alphas_cumprod[t].to(noisy.device, torch.float32)
    return (noisy.float() - (1 - alpha).sqrt() * noise_pred.float()) / alpha.sqrt()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


def identity_pairs(images: torch.Tensor, batch: dict[str, Any], own: torch.Tensor,
                   appearances: Appearances) -> dict[str, Pair]:
    """Per image: subjects whose region carries their own appearance / another subject's, over its
    subjects; `_multi` the same counted on images with two subjects or more only."""
    colours, present = region_colours(images, batch["masks"], batch["valid"])
    outcome = decide(colours.cpu(), present.cpu(), own, appearances)
    counted = (outcome >= 0).sum(1).float()
    multi = (batch["valid"].cpu().sum(1) >= 2).float()
    out = {}
    for name, code in (("accuracy", OWN), ("blending", BLENDED)):
        hits = (outcome == code).sum(1).float()
        out[name] = (hits, counted)
        out[f"{name}_multi"] = (hits * multi, counted * multi)
    return out


def _background_probs(like: torch.Tensor) -> torch.Tensor:
    probs = torch.zeros_like(like)
    probs[..., -1] = 1.0
    return probs


def _random_probs(like: torch.Tensor, route_valid: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """One-hot maps of a route drawn uniformly among the valid ones at every position, seeded per sample."""
    scores = torch.stack([torch.rand(like.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return scores.to(like.device).masked_fill(~route_valid[:, None, :], -1.0)


def router_pairs(routing: dict, batch: dict[str, Any], refs: ReferenceEncoding, seeds: list[int],
                 baselines: bool) -> dict[str, Pair]:
    """Per sample: the sum of the IoUs of its counted (layer, subject) maps and their count, per
    kind of map (refined, coarse; with `baselines` also all-background and uniform random routes)
    and per layer size."""
    out: dict[str, list[Pair]] = defaultdict(list)
    for maps in routing.values():
        kinds = [("refined", maps.probs), ("coarse", maps.coarse)]
        if baselines:
            kinds += [("all_background", _background_probs(maps.probs)),
                      ("uniform_random", _random_probs(maps.probs, refs.route_valid, seeds))]
        for kind, probs in kinds:
            iou, counted = routing_iou(probs, maps.hw, batch["masks"], batch["valid"])
            pair = ((iou * counted).sum(1), counted.sum(1).float())
            out[kind].append(pair)
            out[f"{kind}/res_{maps.hw[0]}x{maps.hw[1]}"].append(pair)
    return {k: (torch.stack([n for n, _ in v]).sum(0), torch.stack([d for _, d in v]).sum(0)) for k, v in out.items()}


@dataclass
class IdentityTargets:
    """What the identity metrics need: the catalogue's appearances and each batch subject's own."""

    appearances: Appearances
    own: torch.Tensor  # (B, N) appearance index, -1 unknown


@torch.no_grad()
def batch_metrics(model: AnyStoryModel, scheduler: DDPMScheduler, vae, cond: Conditions, refs: ReferenceEncoding,
                  batch: dict[str, Any], timesteps: list[int] | tuple[int, ...],
                  variants: dict[str, dict[str, Any]], identity: IdentityTargets | None = None,
                  router_baselines: bool = False) -> dict[str, Pair]:
    """Metric name -> per-sample pair, for each timestep and variant: `loss/<variant>/<region>/t_<t>`,
    `router_miou/<kind>/t_<t>` (the full model's maps), and with `identity` the appearance each
    subject's region carries in the decoded x0 prediction, `identity_x0/<variant>/<accuracy|blending>[_multi]/t_<t>`."""
    keys = list(batch["key"])
    bs = len(keys)
    out: dict[str, Pair] = {}
    for t in timesteps:
        noise = sample_noise(cond.latents, keys, t)
        ts = torch.full((bs,), t, device=cond.latents.device, dtype=torch.long)
        noisy = scheduler.add_noise(cond.latents, noise, ts)
        for name, switches in variants.items():
            given = partial(instance_routes, batch["masks"], batch["valid"]) if name == "ground_truth_routes" else None
            pred = model(noisy, ts, cond.embeds, cond.added, refs, sampling="argmax", given_routes=given, **switches)
            for region, pair in region_losses(pred.noise_pred, noise, batch["masks"], batch["valid"]).items():
                out[f"loss/{name}/{region}/t_{t}"] = pair
            if name == "full" and pred.routing:
                seeds = [sample_seed(k, t) + 1 for k in keys]
                for kind, pair in router_pairs(pred.routing, batch, refs, seeds, router_baselines).items():
                    out[f"router_miou/{kind}/t_{t}"] = pair
            if identity is not None:
                images = decode_latents(vae, predicted_x0(scheduler, noisy, pred.noise_pred, t))
                for metric, pair in identity_pairs(images, batch, identity.own, identity.appearances).items():
                    out[f"identity_x0/{name}/{metric}/t_{t}"] = pair
    return out


@dataclass
class Tally:
    """Per-sample pairs gathered over batches, by metric name."""

    pairs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=lambda: defaultdict(lambda: ([], [])))

    def add(self, metrics: dict[str, Pair]) -> None:
        for name, (num, den) in metrics.items():
            nums, dens = self.pairs[name]
            nums.append(num.detach().double().cpu())
            dens.append(den.detach().double().cpu())

    def per_sample(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs of several metrics summed per sample (e.g. one figure over all timesteps)."""
        nums = torch.stack([torch.cat(self.pairs[n][0]) for n in names]).sum(0)
        dens = torch.stack([torch.cat(self.pairs[n][1]) for n in names]).sum(0)
        return nums, dens

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.pairs if n.startswith(prefix))


def log_batch(log: Callable[..., Any], metrics: dict[str, Pair], names: dict[str, list[str]]) -> None:
    """`log(name, value, batch_size=...)` (LightningModule.log) of each logged name -> the batch's
    ratio over the listed metrics, weighted by its denominator, so that the epoch's weighted mean
    equals the ratio of sums the evaluation reports."""
    for logged, parts in names.items():
        parts = [p for p in parts if p in metrics]
        if not parts:
            continue
        num = sum(float(metrics[p][0].sum()) for p in parts)
        den = sum(float(metrics[p][1].sum()) for p in parts)
        if den > 0:
            log(logged, num / den, batch_size=max(1, round(den)))


def validation_logs(timesteps: list[int] | tuple[int, ...]) -> dict[str, list[str]]:
    """What the training loop logs (name -> the metrics it sums): the evaluation's figures of the
    same names in metrics/eval_details.json (`loss/full/all/all_t` is `val/loss`, ...)."""
    def every(prefix: str, keep: Callable[[int], bool] = lambda t: True) -> list[str]:
        return [f"{prefix}/t_{t}" for t in timesteps if keep(t)]

    return {
        "val/loss": every("loss/full/all"),
        "val/loss_without_subject": every("loss/without_subject/all"),
        "val/loss_subjects": every("loss/full/subjects"),
        "val/loss_subjects_without_subject": every("loss/without_subject/subjects"),
        "val/router_miou": every("router_miou/refined"),
        "val/router_miou_t_le_500": every("router_miou/refined", lambda t: t <= 500),
    }
