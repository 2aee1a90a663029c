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
from copy import copy
from dataclasses import field, make_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from anystory.atomic import write_atomic
from anystory.components import SDXL_SCHEDULER
from anystory.export import load_export
from anystory.model import AnyStoryModel
from anystory.pipeline import AnyStoryPipeline
from anystory.typed_config import ConfigError, parse, read_section
from training.bootstrap import difference_interval, ratio_interval
from training.conditions import encode_conditions
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig, preset_sizes
from training.identity import Appearances, IdentityError, load_catalogue, own_appearances, shard_identities
from training.sampled import sampled_identity
from training.text import TextEncoder
from training.validation import (
    TIMESTEPS,
    VARIANTS,
    IdentityTargets,
    Tally,
    batch_metrics,
    decode_latents,
    identity_pairs,
)

HEADLINE_VARIANTS = ("full", "router_off", "without_subject")


# `chance` exists for identity_sampled only (training.sampled); a variant missing from a kind is skipped.
COMPARED = ("router_off", "without_subject", "clip_only", "referencenet_only", "ground_truth_routes", "chance")


def _time_groups(names: list[str]) -> dict[str, list[str]]:
    """Metric names `<base>/t_<t>` of one base -> the groups reported: all timesteps, t <= 500
    (where the noisy input still shows the layout), and each timestep."""
    by_t = {int(n.rpartition("/t_")[2]): n for n in names}
    groups = {"all_t": list(by_t.values())}
    low = [n for t, n in by_t.items() if t <= 500]
    if low and len(low) < len(by_t):
        groups["t_le_500"] = low
    groups.update({f"t_{t}": [by_t[t]] for t in sorted(by_t)})
    return groups


def _nest(tree: dict[str, Any], path: str) -> dict[str, Any]:
    for part in path.split("/"):
        tree = tree.setdefault(part, {})
    return tree


def summarize(tally: Tally, seed: int = 0) -> dict[str, Any]:
    """Every figure with its bootstrap interval over images (per time group where the metric has
    timesteps); and under `differences`, each variant against the full model on the same images
    (paired intervals)."""
    bases: dict[str, list[str]] = {}
    for name in tally.pairs:
        base, _, t = name.rpartition("/t_")
        bases.setdefault(base if t.isdigit() else name, []).append(name)

    def figure(members: list[str]) -> dict[str, Any]:
        return ratio_interval(*(x.numpy() for x in tally.per_sample(members)), seed=seed)

    details: dict[str, Any] = {}
    for base, names in sorted(bases.items()):
        if names == [base]:  # no timesteps: one figure
            parent, _, leaf = base.rpartition("/")
            _nest(details, parent)[leaf] = figure(names)
            continue
        node = _nest(details, base)
        for group, members in _time_groups(names).items():
            node[group] = figure(members)
    for base, names in sorted(bases.items()):
        kind, variant, *metric = base.split("/")
        if variant != "full" or kind not in ("loss", "identity_x0", "identity_sampled"):
            continue
        for other in COMPARED:
            other_names = [n.replace(f"{kind}/full/", f"{kind}/{other}/", 1) for n in names]
            if not all(n in tally.pairs for n in other_names):
                continue
            node = _nest(details, f"differences/{kind}/{'/'.join(metric)}")
            groups = {"all": names} if names == [base] else _time_groups(names)
            node[f"full_minus_{other}"] = {
                group: difference_interval(*(tuple(x.numpy() for x in tally.per_sample(m))
                                             for m in (members, [n.replace(f"{kind}/full/", f"{kind}/{other}/", 1)
                                                                 for n in members])), seed=seed)
                for group, members in groups.items()}
    return details


def _relative_gain(tally: Tally, timesteps: list[int], variant: str, seed: int) -> dict[str, Any]:
    """1 - loss(variant) / loss(without subject) over all timesteps, with the interval of the same ratio."""
    with_, _ = tally.per_sample([f"loss/{variant}/all/t_{t}" for t in timesteps])
    without, _ = tally.per_sample([f"loss/without_subject/all/t_{t}" for t in timesteps])
    ratio = ratio_interval(with_.numpy(), without.numpy(), seed=seed)
    return {"value": 1.0 - ratio["value"], "low": 1.0 - ratio["high"], "high": 1.0 - ratio["low"], "n": ratio["n"]}


@torch.no_grad()
def evaluate(model: AnyStoryModel, components, batches, timesteps: list[int],
             appearances: Appearances | None = None, identities: dict[str, list[int | None]] | None = None,
             sample_images: int = 0, sample_steps: int = 8, seed: int = 0) -> dict[str, Any]:
    """The metrics of every variant on held-out batches (training.validation.batch_metrics, as the
    training loop's validation computes them), each with a bootstrap 95% interval over images
    (seed `seed`). With the toy world's `appearances` and each sample's identity ids, also the
    identity each subject's region carries in the decoded x0 prediction, and as ceilings in the
    targets themselves and in their VAE reconstruction; and on the first `sample_images` images
    sampled with AnyStoryPipeline in `sample_steps` steps (training.sampled)."""
    device = model.unet.device
    text = TextEncoder(components)
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    tally = Tally()
    pipe = AnyStoryPipeline(model, components) if sample_images else None
    sampled = 0
    samples = 0
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        samples += batch["pixels"].shape[0]
        cond = encode_conditions(components.vae, text, batch, device, sample_latents=False)
        refs = model.encode_references(cond.subjects)
        identity = None
        if appearances is not None and identities is not None:
            own = own_appearances(list(batch["key"]), batch["valid"].shape[1], identities, appearances)
            identity = IdentityTargets(appearances, own)
            # Ceilings: the identity read off the targets, and off what the VAE can give back of them.
            for name, images in (("target", batch["pixels"]),
                                 ("vae_reconstruction", decode_latents(components.vae, cond.latents))):
                tally.add({f"identity_ceiling/{name}/{k}": v for k, v in identity_pairs(images, batch, own, appearances).items()})
        tally.add(batch_metrics(model, scheduler, components.vae, cond, refs, batch, timesteps, VARIANTS,
                                identity=identity, router_baselines=True))
        if identity is not None and sampled < sample_images:
            take = min(batch["pixels"].shape[0], sample_images - sampled)
            part = {k: v[:take] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
            tally.add(sampled_identity(pipe, part, identity.own[:take], appearances, sample_steps))
            sampled += take
    if not samples:
        raise ValueError("no held-out samples were read")
    details = summarize(tally, seed)
    details["relative_gain"] = {v: _relative_gain(tally, timesteps, v, seed) for v in ("full", "ground_truth_routes")}
    miou = details["router_miou"]
    details["router_miou_margin_over_trivial"] = miou["refined"]["all_t"]["value"] - max(
        miou[k]["all_t"]["value"] for k in ("all_background", "uniform_random"))
    details["samples"] = samples
    details["timesteps"] = list(timesteps)
    return details


def headline(details: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The few figures `dvc metrics show` prints: their values (`eval.json`) and, under the same keys,
    their 95% intervals as "low..high" (`eval_ci95.json`), so that the two files print as two rows of
    one table. Identity and blending are over the subjects of multi-subject images."""
    miou = details.get("router_miou", {}).get("refined", {})
    ident = details.get("identity_x0", {})
    loss = details.get("loss", {})
    nodes: dict[str, dict[str, Any] | None] = {
        "router_miou": miou.get("all_t"),
        "router_miou_t500": miou.get("t_le_500"),
        "condition_gain": details["relative_gain"]["full"],
        "subject_loss_full": loss.get("full", {}).get("subjects", {}).get("all_t"),
        "subject_loss_router_off": loss.get("router_off", {}).get("subjects", {}).get("all_t"),
    }
    if ident:
        nodes.update({f"identity_{short}": ident[v]["accuracy_multi"]["all_t"] for v, short in
                      zip(HEADLINE_VARIANTS, ("full", "router_off", "no_condition"), strict=True)})
        nodes.update({f"blending_{short}": ident[v]["blending_multi"]["all_t"] for v, short in
                      (("full", "full"), ("router_off", "router_off"))})
    for variant in ("full", "chance"):
        sampled = details.get("identity_sampled", {}).get(variant)
        if sampled:
            nodes[f"identity_sampled_{variant}"] = sampled["accuracy_multi"]
    kept = {k: n for k, n in nodes.items() if n and n.get("value") is not None}
    values = {"samples": details["samples"], **{k: round(n["value"], 4) for k, n in kept.items()}}
    intervals = {"samples": details["samples"], **{k: f"{n['low']:.3f}..{n['high']:.3f}" for k, n in kept.items()}}
    return values, intervals


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path, help="export directory of the trained model")
    parser.add_argument("--shards", required=True, nargs="+", help="held-out shard folders")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--details", type=Path, default=None,
                        help="every figure with its interval (default: <out stem>_details.json beside --out)")
    parser.add_argument("--catalogue", type=Path, default=None,
                        help="toy-world manifest.json listing the identities: enables the identity metrics")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--max-subjects", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--clip-model", default=None, help="CLIPModel (path / cached hub id) for CLIP-I / CLIP-T")
    parser.add_argument("--dino-model", default=None, help="DINO ViT (path / cached hub id) for DINO")
    parser.add_argument("--generate-steps", type=int, default=25, help="denoising steps of each generated image")
    parser.add_argument("--sample-images", type=int, default=0,
                        help="with --catalogue: identity on this many held-out images sampled from noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=Path, default=None,
                        help="a params.yaml whose train.eval section sets the defaults of the options above")
    args = parser.parse_args(argv)
    if args.params is not None:  # train.eval: defaults of the options above, checked as all params are
        options = {"timesteps": list[int], "batch_size": int, "max_subjects": int, "max_batches": int | None,
                   "generate_steps": int}
        defaults = {key: parser.get_default(key) for key in options}
        schema = make_dataclass("TrainEval", [(key, tp, field(default_factory=partial(copy, defaults[key])))
                                              for key, tp in options.items()])
        try:
            section = read_section(args.params, "train.eval") or {}
            given = parse(schema, section, "train.eval")
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
        parser.set_defaults(**{key: getattr(given, key) for key in section})
        args = parser.parse_args(argv)

    appearances = identities = None
    if args.catalogue is not None:
        try:
            appearances = Appearances.of(load_catalogue(args.catalogue))
        except IdentityError as err:
            raise SystemExit(f"error: --catalogue {err}") from None
    model, components = load_export(args.export, device=args.device)
    cfg = model.config
    data = ShardDataModule(train_shards=[], val_shards=list(args.shards), batch_size=args.batch_size,
                           num_workers=0, sample=SampleConfig(**preset_sizes(cfg), max_subjects=args.max_subjects))
    batches = data.val_dataloader()
    if args.max_batches is not None:
        batches = [b for i, b in zip(range(args.max_batches), batches, strict=False)]
    else:
        batches = list(batches)
    if appearances is not None:
        identities = shard_identities(list(args.shards))
    details = evaluate(model, components, batches, args.timesteps, appearances, identities,
                       sample_images=args.sample_images, sample_steps=args.generate_steps)
    if args.clip_model or args.dino_model:
        from training.image_metrics import subject_similarity

        details["image_metrics"] = subject_similarity(model, components, batches, args.clip_model, args.dino_model,
                                                      steps=args.generate_steps)
    values, intervals = headline(details)
    write_json(args.details or args.out.with_name(f"{args.out.stem}_details.json"), details)
    write_json(args.out.with_name(f"{args.out.stem}_ci95.json"), intervals)
    write_json(args.out, values)
    print("\n".join(f"{key:<24} {values[key]:<8} {intervals[key]}" for key in values))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
