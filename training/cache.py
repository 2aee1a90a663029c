"""Encoder cache stage: run the frozen encoders once over the training shards (docs/encoder_cache.md).

    python -m training.cache --config training/configs/tiny_stage1.yaml --base-dir runs/toy_base/model \\
        --shards data/shards/unpaired data/shards/paired --out data/encoder_cache [--variants 4]
        [--num-gpus 1 --concurrency 8] [--dtype bfloat16] [--runner ray|local] [--address HOST:PORT]

Per sample key and per variant (one draw of the target crop and the reference augmentations), the
cache holds the target's VAE posterior (mean, log-variance), every reference's VAE latents, latent
mask and CLIP tokens, the instance masks and SDXL time ids; per key, both text encoders' states
and the pooled embedding. One Ray actor per `--concurrency` (`--num-gpus` GPUs each) writes whole
cache shards: tar to a temporary name, renamed, then its stats file, the mark of a complete shard.
A rerun skips the cache shards that are current. Exit codes: 0 done; 2 a user error (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
import yaml
from safetensors.torch import save as save_tensors

from anystory.atomic import write_atomic
from training.data.augment import AugmentConfig
from training.data.cached import (
    FORMAT,
    MANIFEST,
    MEMBER,
    NULL,
    EncoderCacheError,
    cache_shard_path,
    manifest_fingerprint,
    model_fields,
    sample_fields,
    source_fingerprint,
    stats_of,
    variant_rng,
)
from training.data.datamodule import ErrorNames, NoShards, list_shards
from training.data.sample import DecodeSample, SampleConfig, SampleError, checked_preset_sizes

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CacheSpec:
    """Everything a worker needs (sent to the Ray actors)."""

    sample: SampleConfig  # as decoded for the cache: every subject in stored order, nothing dropped
    model: dict[str, Any]  # AnyStoryModule hyper-parameters that build the frozen base
    variants: int
    seed: int
    dtype: str  # storage dtype
    batch_size: int  # samples per encoder call (x variants)

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "sample": json.loads(json.dumps(sample_fields(self.sample))),
                "max_subjects": self.sample.max_subjects, "variants": self.variants, "seed": self.seed,
                "dtype": self.dtype, "model": model_fields(self.model)}


class CacheWorker:
    """The frozen encoders of one run's base, on one device; writes cache shards. The model code is
    imported here, in the worker, so that the Ray driver starts without it."""

    def __init__(self, spec: CacheSpec, use_gpu: bool) -> None:
        from anystory.model import clip_tokens
        from anystory.preprocess import encode_subjects
        from training.module import Stage1Module  # the run's own way of building its base
        from training.text import TextEncoder

        self.clip_tokens, self.encode_subjects = clip_tokens, encode_subjects
        self.spec = spec
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        components = Stage1Module(**spec.model).build_components()
        self.vae = components.vae.to(self.device).eval()
        self.image_encoder = components.image_encoder.to(self.device).eval()
        for module in (components.text_encoder, components.text_encoder_2):
            module.to(self.device).eval()
        self.text = TextEncoder(components)
        self.decode = DecodeSample(spec.sample)
        self.store = getattr(torch, spec.dtype)

    def _stored(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.store) if v.is_floating_point() else v).contiguous().cpu() for k, v in tensors.items()}

    @torch.no_grad()
    def null_entries(self) -> dict[str, torch.Tensor]:
        """What a row holds for an absent condition: the empty caption's text states, the zero
        image's CLIP tokens (background route, CLIP drop, padding) and a zero reference's latents."""
        cfg = self.spec.sample
        embeds, pooled = self.text([""], self.device)
        tokens = self.clip_tokens(self.image_encoder, torch.zeros(1, 3, cfg.clip_size, cfg.clip_size, device=self.device))
        zero = torch.zeros(1, 1, 3, cfg.ref_size, cfg.ref_size, device=self.device)
        subjects = self.encode_subjects(self.vae, zero, zero, zero[:, :, :1], torch.ones(1, 1, dtype=torch.bool))
        return self._stored({"text_embeds": embeds[0], "text_pooled": pooled[0], "clip_tokens": tokens[0],
                             "ref_latents": subjects.ref_latents[0, 0]})

    @torch.no_grad()
    def _encode(self, chunk: list[tuple[str, str, list[dict[str, Any]]]]) -> list[dict[str, torch.Tensor]]:
        """(key, caption, variants) per sample -> its cache tensors; one encoder call per chunk."""
        rows = [row for _, _, variants in chunk for row in variants]
        d = self.device
        params: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for size in {row["pixels"].shape for row in rows}:  # one VAE call per target size (bucket)
            index = [i for i, row in enumerate(rows) if row["pixels"].shape == size]
            pixels = torch.stack([rows[i]["pixels"] for i in index]).to(d, self.vae.dtype)
            for i, moments in zip(index, self.vae.encode(pixels).latent_dist.parameters, strict=True):
                params[i] = moments
        valid = torch.cat([row["valid"] for row in rows])  # the decode keeps >= 1 subject per sample
        refs = torch.cat([row["ref_pixels"] for row in rows])[valid][None].to(d)
        ref_masks = torch.cat([row["ref_masks"] for row in rows])[valid][None].to(d)
        clip = torch.cat([row["clip_pixels"] for row in rows])[valid].to(d)
        subjects = self.encode_subjects(self.vae, clip[None], refs, ref_masks, torch.ones(1, len(clip), dtype=torch.bool))
        tokens = self.clip_tokens(self.image_encoder, clip)
        embeds, pooled = self.text([caption for _, caption, _ in chunk], d)
        out, r, s = [], 0, 0  # next row, next subject
        for i, (_, _, variants) in enumerate(chunk):
            entry = {"text_embeds": embeds[i], "text_pooled": pooled[i]}
            for v, row in enumerate(variants):
                n = int(row["valid"].sum())
                entry.update({f"v{v}.latent_params": params[r], f"v{v}.time_ids": row["time_ids"],
                              f"v{v}.ref_latents": subjects.ref_latents[0, s : s + n],
                              f"v{v}.ref_latent_masks": subjects.ref_masks[0, s : s + n],
                              f"v{v}.clip_tokens": tokens[s : s + n],
                              # the decode's masks are uint8 / 255: stored exactly as uint8
                              f"v{v}.masks": (row["masks"][:n] * 255).round().to(torch.uint8)})
                r, s = r + 1, s + n
            out.append(self._stored(entry))
        return out

    def write(self, sample_tar: str, out_tar: str) -> dict[str, Any]:
        """One sample shard -> its cache shard (tmp + rename), then its stats file. Samples the decode
        rejects are left out and counted, as training would skip them."""
        spec = self.spec
        source = source_fingerprint(sample_tar)
        rejected: dict[str, int] = {}
        chunk: list[tuple[str, str, list[dict[str, Any]]]] = []
        written = 0
        os.makedirs(os.path.dirname(out_tar), exist_ok=True)
        tmp = f"{out_tar}.{os.getpid()}.tmp"

        def flush(sink: wds.TarWriter) -> int:
            for (key, caption, variants), tensors in zip(chunk, self._encode(chunk), strict=True):
                meta = {"caption": caption, "num_subjects": int(variants[0]["valid"].sum()), "variants": spec.variants,
                        "image_subjects": variants[0]["image_subjects"]}  # before max_subjects cut
                sink.write({"__key__": key, "json": json.dumps(meta).encode(), MEMBER: save_tensors(tensors)})
            n = len(chunk)
            chunk.clear()
            return n

        try:
            with open(tmp, "wb") as handle:
                with wds.TarWriter(handle) as sink:
                    errors = ErrorNames()  # a damaged tar: what it held up to the damage is cached, the rest counted
                    for raw in wds.tarfile_samples([{"url": sample_tar}], handler=errors):
                        key = raw.get("__key__", "")
                        try:
                            variants = [self.decode(raw, variant_rng(spec.seed, key, v), train=True)
                                        for v in range(spec.variants)]
                        except SampleError as err:
                            rejected[str(err)] = rejected.get(str(err), 0) + 1
                            continue
                        chunk.append((key, variants[0]["caption"], variants))
                        if len(chunk) == spec.batch_size:
                            written += flush(sink)
                    if chunk:
                        written += flush(sink)
                    for error in errors:
                        rejected[f"tar: {error}"] = rejected.get(f"tar: {error}", 0) + 1
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, out_tar)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        stats = {"samples": written, "rejected": rejected, "source": source,
                 "fingerprint": manifest_fingerprint(spec.manifest())}
        write_atomic(stats_of(out_tar), json.dumps(stats, indent=1))
        return {"shard": out_tar, **stats}


def is_current(sample_tar: str, out_tar: str, fingerprint: str) -> bool:
    try:
        with open(stats_of(out_tar)) as handle:
            stats = json.load(handle)
    except (OSError, ValueError):
        return False
    return (os.path.exists(out_tar) and stats.get("fingerprint") == fingerprint
            and stats.get("source") == source_fingerprint(sample_tar))


def plan(shards: list[str], out: str, fingerprint: str) -> list[tuple[str, str]]:
    """(sample shard, cache shard) pairs still to write; folders of one name would share a cache folder."""
    folders: dict[str, str] = {}
    for tar in shards:
        folder = os.path.dirname(os.path.abspath(tar))
        other = folders.setdefault(os.path.basename(folder), folder)
        if other != folder:
            raise EncoderCacheError(f"--shards {other} and {folder}: one folder name, one cache folder; rename one")
    pairs = [(tar, cache_shard_path(out, tar)) for tar in shards]
    return [(tar, cached) for tar, cached in pairs if not is_current(tar, cached, fingerprint)]


def preset_sample_config(sample_args: dict[str, Any], preset_name: str) -> SampleConfig:
    """A config's data.sample with the image sizes of its model preset, as the training CLI derives
    them (training/__main__.py); a written size that differs is a ValueError naming the key."""
    sample_args = {**sample_args, **checked_preset_sizes(preset_name, sample_args)}
    augment = sample_args.pop("augment", {})
    try:
        return SampleConfig(**sample_args, augment=AugmentConfig(**augment) if augment is not None else None)
    except TypeError as err:
        raise ValueError(f"data.sample: {err}") from None


def load_spec(args: argparse.Namespace) -> CacheSpec:
    """The training config's sample sizes and augmentation and its model's base; `--base-dir` as the
    run's `--model.init_args.base_dir` override."""
    try:
        config = yaml.safe_load(Path(args.config).read_text())
        sample_args = dict((config.get("data") or {}).get("sample") or {})
        init_args = dict((config.get("model") or {}).get("init_args") or {})
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise EncoderCacheError(f"--config {args.config}: unreadable ({type(err).__name__})") from None
    try:
        sample = preset_sample_config(sample_args, init_args.get("preset", "tiny"))
    except ValueError as err:
        raise EncoderCacheError(f"--config {args.config}: {err}") from None
    # Every subject, in stored order, nothing dropped: those choices stay per load.
    sample = replace(sample, max_subjects=args.max_subjects, shuffle_subjects=False, caption_drop=0.0, clip_drop=0.0,
                     max_image_subjects=None)  # the cache holds every sample; each run picks its own
    model = {key: init_args.get(key) for key in ("preset", "weights", "base_dir", "seed", "frozen_dtype",
                                                  "tokenizer_dir") if init_args.get(key) is not None}
    if args.base_dir is not None:
        model["base_dir"] = args.base_dir
    if model.get("base_dir") and not Path(model["base_dir"], "vae").is_dir():
        raise EncoderCacheError(f"--base-dir {model['base_dir']}: not a base model folder (no vae/)")
    defaults = {"preset": "tiny", "weights": None, "base_dir": None, "seed": 0, "frozen_dtype": "float32"}
    return CacheSpec(sample=sample, model={**defaults, **model}, variants=args.variants, seed=args.seed,
                     dtype=args.dtype, batch_size=args.batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config whose data.sample and base it caches for")
    ap.add_argument("--base-dir", default=None, help="as the run's --model.init_args.base_dir")
    ap.add_argument("--shards", nargs="+", required=True, help="sample shard folders (the run's data.train_shards)")
    ap.add_argument("--out", required=True, help="the cache folder (the run's data.cache_dir)")
    ap.add_argument("--variants", type=int, default=4, help="augmentation draws per sample (K)")
    ap.add_argument("--max-subjects", type=int, default=4, help="subjects kept per sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the cached tensors")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per encoder call (each with its variants)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0: CPU actors)")
    ap.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    ap.add_argument("--runner", choices=["ray", "local"], default="ray", help="local: one process, no Ray")
    ap.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS; neither: a private one)")
    args = ap.parse_args(argv)
    for name in ("variants", "max_subjects", "batch_size", "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run(spec: CacheSpec, out: str, jobs: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write the null entries (once) and the pending cache shards; returns their stats."""
    if args.runner == "local":
        worker = CacheWorker(spec, use_gpu=args.num_gpus > 0)
        write_atomic(os.path.join(out, NULL), save_tensors(worker.null_entries()))
        return [worker.write(*job) for job in jobs]
    import ray
    from ray.util import ActorPool

    from pipelines.build_shards import init_ray

    started = not ray.is_initialized()
    init_ray(args.address or os.environ.get("RAY_ADDRESS") or None, None)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if args.num_gpus > gpus:  # the actors would wait for them forever
            raise EncoderCacheError(f"--num-gpus {args.num_gpus}: the Ray cluster has {gpus:g} GPUs")
        actor = ray.remote(num_cpus=1, num_gpus=args.num_gpus)(CacheWorker)
        actors = [actor.remote(spec, args.num_gpus > 0) for _ in range(min(args.concurrency, max(1, len(jobs))))]
        write_atomic(os.path.join(out, NULL), save_tensors(ray.get(actors[0].null_entries.remote())))
        return list(ActorPool(actors).map_unordered(lambda a, job: a.write.remote(*job), jobs))
    finally:
        if started:  # a caller's Ray (or a cluster) stays; our private instance goes with the job
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args)
        shards = list_shards(args.shards)
        manifest = spec.manifest()
        jobs = plan(shards, args.out, manifest_fingerprint(manifest))
    except (EncoderCacheError, NoShards) as err:
        print(f"python -m training.cache: error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # The manifest first: shards of an older manifest then fail the training check until rewritten.
    write_atomic(os.path.join(args.out, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    print(f"encoder cache {args.out}: {len(jobs)} of {len(shards)} shards to write "
          f"({spec.variants} variants, {args.runner})", flush=True)
    if not jobs and os.path.exists(os.path.join(args.out, NULL)):
        return 0
    try:
        results = run(spec, args.out, jobs, args)
    except EncoderCacheError as err:
        print(f"python -m training.cache: error: {err}", file=sys.stderr)
        return 2
    for stats in results:
        rejected = sum(stats["rejected"].values())
        print(f"  {stats['shard']}: {stats['samples']} samples" + (f", {rejected} rejected" if rejected else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
