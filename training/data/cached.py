"""The encoder cache (docs/encoder_cache.md), reading side: its layout, the checks that a cache fits
the run and the shards it was made from, and the decode of a cached sample into a batch row.

Layout, for sample shards `<folder>/NNNNNN.tar`:
    <cache>/cache.json                 what the cache was made with (sample sizes, augmentation, base)
    <cache>/null.safetensors           the encodings of what a row holds when a condition is absent:
                                       the empty caption, the zero CLIP image, a zero reference
    <cache>/<folder name>/NNNNNN.tar   per sample key: `json` and `enc.safetensors` (K variants)
    <cache>/<folder name>/NNNNNN.stats.json   written after the tar: the cache shard is complete

A cached sample holds K variants, each one draw of the per-load randomness that precedes the
encoders (target crop, reference rotation/crop/padding). The rest stays random per load: the
variant, the subject order and subset, the caption and CLIP-condition drops."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from training.data.sample import SampleConfig, SampleError, check_selected

FORMAT = 1
MANIFEST = "cache.json"
NULL = "null.safetensors"
MEMBER = "enc.safetensors"
# SampleConfig fields that decide what the encoders saw; they must match between cache and run.
SAMPLE_KEYS = ("resolution", "clip_size", "ref_size", "random_crop", "augment", "buckets", "bucket_multiple")
# Model hyper-parameters that decide the frozen encoders.
MODEL_KEYS = ("preset", "weights", "base_dir", "seed", "frozen_dtype")


class EncoderCacheError(ValueError):
    """A cache that is missing, unreadable, stale or made for another run; the message names its path."""


def variant_rng(seed: int, key: str, variant: int) -> random.Random:
    """The draws of variant `variant` of sample `key`: the same whichever worker or shard order."""
    return random.Random(f"encoder-cache-{seed}-{key}-{variant}")


def cache_shard_path(cache_dir: str, sample_tar: str) -> str:
    """`<cache>/<folder name>/NNNNNN.tar` for `<folder>/NNNNNN.tar`."""
    return os.path.join(cache_dir, os.path.basename(os.path.dirname(sample_tar)), os.path.basename(sample_tar))


def stats_of(tar: str) -> str:
    return tar[: -len(".tar")] + ".stats.json"


def source_fingerprint(sample_tar: str) -> dict[str, Any]:
    """What identifies a published sample shard: its size and its stats file's hash (a rebuild
    rewrites both; mtimes change on a mere `dvc checkout`)."""
    digest = hashlib.sha256(Path(stats_of(sample_tar)).read_bytes()).hexdigest()
    return {"tar_bytes": os.path.getsize(sample_tar), "stats_sha256": digest}


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def sample_fields(config: SampleConfig) -> dict[str, Any]:
    fields = asdict(config)
    return {key: fields[key] for key in SAMPLE_KEYS}


def model_fields(hparams: dict[str, Any]) -> dict[str, Any]:
    """The frozen base a run loads; a base folder as an absolute path (runs start in other folders)."""
    out = {key: hparams.get(key) for key in MODEL_KEYS}
    if out["base_dir"]:
        out["base_dir"] = os.path.abspath(out["base_dir"])
    if out["base_dir"] or out["weights"]:
        out["seed"] = None  # the seed picks random weights only when nothing is loaded
    return out


def _jsonable(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so that comparisons are like for like."""
    return json.loads(json.dumps(value))


def read_manifest(cache_dir: str) -> dict[str, Any]:
    path = os.path.join(cache_dir, MANIFEST)
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise EncoderCacheError(f"encoder cache {path}: missing (make it with python -m training.cache)") from None
    except (OSError, ValueError) as err:
        raise EncoderCacheError(f"encoder cache {path}: unreadable ({type(err).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EncoderCacheError(f"encoder cache {path}: not a cache of format {FORMAT}; make it again")
    return manifest


def check_manifest(cache_dir: str, manifest: dict[str, Any], sample: SampleConfig,
                   model: dict[str, Any] | None) -> None:
    """The run's sample settings (and, given, its model's frozen base) against the cache's."""
    path = os.path.join(cache_dir, MANIFEST)
    cached = manifest["sample"]
    for key, ours in sample_fields(sample).items():
        if cached.get(key) != _jsonable(ours):
            raise EncoderCacheError(f"encoder cache {path}: made with sample.{key}={cached.get(key)!r}, "
                                    f"this run has data.sample.{key}={_jsonable(ours)!r}")
    if sample.max_subjects > manifest["max_subjects"]:
        raise EncoderCacheError(f"encoder cache {path}: holds at most {manifest['max_subjects']} subjects per sample, "
                                f"this run has data.sample.max_subjects={sample.max_subjects}")
    if model is not None:
        ours = _jsonable(model_fields(model))
        for key, value in ours.items():
            if manifest["model"].get(key) != value:
                raise EncoderCacheError(f"encoder cache {path}: made with model.init_args.{key}="
                                        f"{manifest['model'].get(key)!r}, this run has {value!r}")


def cache_shards(cache_dir: str, sample_shards: list[str], manifest: dict[str, Any]) -> list[str]:
    """The complete, current cache shard of every sample shard, or an error naming the first that
    is missing, unfinished or made from another version of its sample shard or another cache."""
    fingerprint = manifest_fingerprint(manifest)
    out = []
    for tar in sample_shards:
        if ":" in tar.split("/")[0] and not tar.startswith("file:"):
            raise EncoderCacheError(f"encoder cache {cache_dir}: shard {tar} is a URL; the cache reads local shards")
        cached = cache_shard_path(cache_dir, tar)
        try:
            with open(stats_of(cached)) as handle:
                stats = json.load(handle)
        except FileNotFoundError:
            raise EncoderCacheError(f"encoder cache {cached}: missing for {tar} (run python -m training.cache)") from None
        except (OSError, ValueError) as err:
            raise EncoderCacheError(f"encoder cache {stats_of(cached)}: unreadable ({type(err).__name__})") from None
        if not os.path.exists(cached):
            raise EncoderCacheError(f"encoder cache {cached}: missing for {tar} (run python -m training.cache)")
        if stats.get("fingerprint") != fingerprint:
            raise EncoderCacheError(f"encoder cache {cached}: made with other settings than {cache_dir}/{MANIFEST} "
                                    "(an interrupted re-run?): run python -m training.cache again")
        if stats.get("source") != source_fingerprint(tar):
            raise EncoderCacheError(f"encoder cache {cached}: stale, {tar} was rebuilt after it: "
                                    "run python -m training.cache again")
        out.append(cached)
    return out


def read_null(cache_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(cache_dir, NULL)
    try:
        return load_file(path)
    except FileNotFoundError:
        raise EncoderCacheError(f"encoder cache {path}: missing (make it with python -m training.cache)") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise EncoderCacheError(f"encoder cache {path}: unreadable ({type(err).__name__})") from None


class DecodeCached:
    """Callable on a raw cache sample (member name -> bytes) -> a batch row whose encoder outputs are
    already there; draws the variant and the per-load choices. Raises SampleError (counted, skipped)."""

    def __init__(self, config: SampleConfig, null: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.null = null

    def __call__(self, sample: dict[str, Any], rng: random.Random, train: bool = True) -> dict[str, Any]:
        cfg = self.config
        try:
            meta = json.loads(sample["json"])
            tensors = load_tensors(sample[MEMBER])
            n, variants = int(meta["num_subjects"]), int(meta["variants"])
            image_subjects = int(meta.get("image_subjects", n))
        except Exception as err:  # any damage to a member: the sample is skipped and counted
            raise SampleError("undecodable encoder cache sample") from err
        check_selected(image_subjects, cfg, train)
        v = rng.randrange(variants)
        order = list(range(n))
        if train and cfg.shuffle_subjects:
            rng.shuffle(order)
        order = order[: cfg.max_subjects]
        s, null = cfg.max_subjects, self.null
        ref_latents = null["ref_latents"].expand(s, *null["ref_latents"].shape).clone()
        clip_tokens = null["clip_tokens"].expand(s, *null["clip_tokens"].shape).clone()
        latent_masks = torch.zeros(s, *tensors[f"v{v}.ref_latent_masks"].shape[1:])
        masks = torch.zeros(s, *tensors[f"v{v}.masks"].shape[1:])  # the square, or the sample's bucket
        valid = torch.zeros(s, dtype=torch.bool)
        for slot, i in enumerate(order):
            ref_latents[slot] = tensors[f"v{v}.ref_latents"][i]
            clip_tokens[slot] = tensors[f"v{v}.clip_tokens"][i]
            latent_masks[slot] = tensors[f"v{v}.ref_latent_masks"][i]
            masks[slot] = tensors[f"v{v}.masks"][i].float() / 255.0  # stored as the uint8 the decode resized
            valid[slot] = True
        drop_caption = train and rng.random() < cfg.caption_drop
        text = null if drop_caption else tensors
        return {
            "key": sample.get("__key__", ""),
            "caption": "" if drop_caption else str(meta.get("caption", "")),
            "time_ids": tensors[f"v{v}.time_ids"].float(),
            "masks": masks,
            "valid": valid,
            "drop": torch.tensor(train and rng.random() < cfg.clip_drop),
            "latent_params": tensors[f"v{v}.latent_params"],
            "text_embeds": text["text_embeds"],
            "text_pooled": text["text_pooled"],
            "ref_latents": ref_latents,
            "ref_latent_masks": latent_masks,
            "clip_tokens": clip_tokens,
            "null_clip_tokens": null["clip_tokens"],
        }
