"""`python -m training.evaluate --export DIR --shards DIR ... --out metrics/eval.json`: the numbers
the paper does not report (paper.md Section 8, items 31-34), on held-out shards.

- router mIoU of the argmax maps against the instance masks, teacher-forced at several timesteps,
  per resolution, for the refined and the coarse maps, and for trivial baselines (all background,
  uniform random routes);
- validation diffusion loss with and without the subject condition, and the paper's ablations as
  numbers: CLIP only / ReferenceNet only / both, router on / off, and ground-truth routes (a perfect router);
- with image models configured (--clip-model, --dino-model): CLIP-I, DINO and CLIP-T per subject on
  generated images, and a blending score (similarity of a subject's crop to the other references)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler

from anystory.components import SDXL_SCHEDULER
from anystory.export import load_export
from anystory.losses import instance_routes, routing_iou
from anystory.model import AnyStoryModel
from training.conditions import encode_conditions, seeded_noise
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.text import TextEncoder

# Switches of each ablation: (router, subject_attention, reference_attention, eta)
ABLATIONS = {
    "both": dict(router=True),
    "clip_only": dict(router=True, reference_attention=False),
    "referencenet_only": dict(router=True, subject_attention=False),
    "router_off": dict(router=False),
    "without_subject": dict(router=True, eta=0.0, reference_attention=False),
    "ground_truth_routes": dict(router=True),  # the routes of the instance masks: a perfect router
}


@dataclass
class _Mean:
    total: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.sum())
        self.count += int(values.numel())

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def _ious(probs: torch.Tensor, hw: tuple[int, int], masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    iou, counted = routing_iou(probs, hw, masks, valid)
    return iou[counted]


def _background_probs(like: torch.Tensor) -> torch.Tensor:
    """Every position routed to the background (the last route)."""
    probs = torch.zeros_like(like)
    probs[..., -1] = 1.0
    return probs


def _random_probs(like: torch.Tensor, route_valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One-hot maps of a route drawn uniformly among the valid ones at every position."""
    scores = torch.rand(like.shape, generator=generator, device="cpu").to(like.device)
    return scores.masked_fill(~route_valid[:, None, :], -1.0)


@torch.no_grad()
def evaluate(model: AnyStoryModel, components, batches, timesteps: list[int], seed: int = 0) -> dict[str, Any]:
    device = model.unet.device
    text = TextEncoder(components)
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    losses: dict[str, _Mean] = defaultdict(_Mean)
    miou: dict[str, dict[str, _Mean]] = defaultdict(lambda: defaultdict(_Mean))
    generator = torch.Generator().manual_seed(seed)
    samples = 0
    for batch_index, batch in enumerate(batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        bs = batch["pixels"].shape[0]
        samples += bs
        cond = encode_conditions(components.vae, text, batch, device, sample_latents=False)
        refs = model.encode_references(cond.subjects)
        for t in timesteps:
            noise = seeded_noise(cond.latents, batch_index * 7919 + t)
            ts = torch.full((bs,), t, device=device, dtype=torch.long)
            noisy = scheduler.add_noise(cond.latents, noise, ts)
            for name, switches in ABLATIONS.items():
                given = partial(instance_routes, batch["masks"], batch["valid"]) if name == "ground_truth_routes" else None
                out = model(noisy, ts, cond.embeds, cond.added, refs, sampling="argmax", given_routes=given, **switches)
                losses[name].add(F.mse_loss(out.noise_pred.float(), noise.float(), reduction="none").mean((1, 2, 3)))
                if name != "both":
                    continue
                for maps in out.routing.values():
                    size = f"{maps.hw[0]}x{maps.hw[1]}"
                    for kind, probs in (("refined", maps.probs), ("coarse", maps.coarse),
                                        ("all_background", _background_probs(maps.probs)),
                                        ("uniform_random", _random_probs(maps.probs, refs.route_valid, generator))):
                        values = _ious(probs, maps.hw, batch["masks"], batch["valid"])
                        for key in ("overall", f"res_{size}", f"t_{t}"):
                            miou[kind][key].add(values)
    if not samples:
        raise ValueError("no held-out samples were read")
    loss = {name: m.value for name, m in losses.items()}
    result = {
        "samples": samples,
        "timesteps": timesteps,
        "router_miou": {kind: {k: m.value for k, m in sorted(v.items())} for kind, v in miou.items()},
        "val_loss": {"with_subject": loss["both"], "without_subject": loss["without_subject"],
                     "relative_gain": 1.0 - loss["both"] / loss["without_subject"],
                     # what the encoder gives when every position gets its own subject: the gain's
                     # share that the router's mistakes cost
                     "relative_gain_with_ground_truth_routes": 1.0 - loss["ground_truth_routes"] / loss["without_subject"]},
        "ablations_val_loss": {k: loss[k] for k in ("both", "clip_only", "referencenet_only", "router_off",
                                                    "ground_truth_routes")},
    }
    refined = result["router_miou"]["refined"]["overall"]
    best_trivial = max(result["router_miou"][k]["overall"] for k in ("all_background", "uniform_random"))
    result["router_miou_margin_over_trivial"] = refined - best_trivial
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path, help="export directory of the trained model")
    parser.add_argument("--shards", required=True, nargs="+", help="held-out shard folders")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[200, 500, 800])
    parser.add_argument("--max-subjects", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--clip-model", default=None, help="CLIPModel (path / cached hub id) for CLIP-I / CLIP-T")
    parser.add_argument("--dino-model", default=None, help="DINO ViT (path / cached hub id) for DINO")
    parser.add_argument("--generate-steps", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=Path, default=None,
                        help="a params.yaml whose train.eval section sets the defaults of the options above")
    args = parser.parse_args(argv)
    if args.params is not None:
        section = (yaml.safe_load(args.params.read_text()).get("train") or {}).get("eval") or {}
        unknown = set(section) - {"timesteps", "batch_size", "max_subjects", "max_batches", "generate_steps"}
        if unknown:
            raise SystemExit(f"error: unknown keys in train.eval of {args.params}: {sorted(unknown)}")
        parser.set_defaults(**section)
        args = parser.parse_args(argv)

    model, components = load_export(args.export, device=args.device)
    cfg = model.config
    data = ShardDataModule(train_shards=[], val_shards=list(args.shards), batch_size=args.batch_size,
                           num_workers=0, sample=SampleConfig(resolution=cfg.resolution, clip_size=cfg.clip_image_size,
                                                              ref_size=cfg.ref_size, max_subjects=args.max_subjects))
    batches = data.val_dataloader()
    if args.max_batches is not None:
        batches = [b for i, b in zip(range(args.max_batches), batches, strict=False)]
    else:
        batches = list(batches)
    result = evaluate(model, components, batches, args.timesteps)
    if args.clip_model or args.dino_model:
        from training.image_metrics import subject_similarity

        result["image_metrics"] = subject_similarity(model, components, batches, args.clip_model, args.dino_model,
                                                     steps=args.generate_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps({k: result[k] for k in ("samples", "val_loss", "router_miou_margin_over_trivial")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
