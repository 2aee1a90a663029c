"""The `data` section of params.yaml: every threshold and size of the data build, validated at start."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt

from anystory.typed_config import ConfigError, parse, read_section
from pipelines.sources import SOURCE_TYPES

# Bump when a change of code changes what a shard contains: done shards of another version are redone.
PIPELINE_VERSION = "2"  # 2: subjects stacked in fixed members (pipelines/shards/contract.py)

Kind = Literal["unpaired", "paired"]
KINDS: tuple[str, ...] = ("unpaired", "paired")


@dataclass
class ToyworldConfig:
    out_dir: str = "data/toyworld"
    seed: int = 0
    num_identities: int = 16
    num_images: int = 96
    image_size: int = 128
    max_subjects: int = 4
    num_videos: int = 12
    video_size: int = 128
    video_fps: int = 8
    video_seconds: float = 2.0
    max_video_subjects: int = 3
    scene_cut_fraction: float = 0.5
    png_fraction: float = 0.1
    empty_fraction: float = 0.05  # images with no subject: the 'nothing found' case
    jpeg_quality: int = 92
    # "phrase": "a red striped circle" names the whole identity, so a reference adds little to the text;
    # "label": "a circle", as a caption names "a man": the reference must carry who it is.
    caption: str = "phrase"
    # A subject's radius as a fraction of the image side, drawn from [low, high): alone in its image,
    # and beside others (smaller, so that up to max_subjects fit with 40% of each one visible).
    subject_scale: tuple[float, float] = (0.18, 0.32)
    multi_subject_scale: tuple[float, float] = (0.1, 0.22)

    def check(self, path: str) -> None:
        for key in ("subject_scale", "multi_subject_scale"):
            low, high = getattr(self, key)
            if not 0 < low < high <= 0.5:
                raise ConfigError(f"{path}.{key}: [{low}, {high}] must satisfy 0 < low < high <= 0.5 "
                                  "(a radius as a fraction of the image side)")


@dataclass
class SourcesConfig:
    unpaired: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DecodeConfig:
    min_side: int = 16
    max_side: int = 16384
    max_pixels: int = 100_000_000
    max_video_frames: int = 20_000
    max_short_side: PositiveInt | None = 1024  # output size: short side at most this, never upscaled; null keeps it
    center_crop: bool = False  # then the centre square (img2dataset's center_crop)


@dataclass(frozen=True)
class TinySamSizes:
    """Explicit sizes for a cut-down `Sam` (tests, smoke runs); the vit_* types use the registry sizes."""

    image_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 64
    encoder_depth: int = 2
    encoder_num_heads: int = 2
    encoder_global_attn_indexes: tuple[int, ...] = (1,)
    window_size: int = 4
    prompt_embed_dim: int = 32
    decoder_depth: int = 2
    decoder_mlp_dim: int = 64
    decoder_num_heads: int = 2
    iou_head_hidden_dim: int = 32


@dataclass(frozen=True)
class AutoAnnotateConfig:
    """The GroundingDINO + SAM models of `auto` annotation (pipelines/auto_annotator.py): `data.annotate.auto.model`."""

    gdino_config: str  # GroundingDINO python config file (SLConfig format)
    gdino_checkpoint: str  # .pth ({"model": state_dict} or a plain state dict) or .safetensors
    gdino_text_encoder: str  # local dir with the BERT model + tokenizer; overrides the config's text_encoder_type
    sam_model_type: Literal["vit_b", "vit_l", "vit_h", "tiny"]  # tiny: built from `tiny_sam`
    sam_checkpoint: str
    box_threshold: ClosedUnitInterval = 0.3
    text_threshold: ClosedUnitInterval = 0.25
    device: str = "cpu"
    max_boxes_per_label: PositiveInt = 3
    max_labels: PositiveInt = 8  # noun phrases per prompt
    nms_iou: ClosedUnitInterval = 0.7  # same-label duplicates above this IoU are dropped before SAM
    mask_box_margin: NonNegativeFloat | None = 0.1  # mask pixels beyond the box grown by this fraction are cleared
    min_image_side: PositiveInt = 16
    gdino_image_size: PositiveInt = 800  # shorter side, as in GroundingDINO's own inference
    gdino_max_image_size: PositiveInt = 1333
    gdino_batch_size: PositiveInt = 8
    tiny_sam: TinySamSizes | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (YAML / JSON); `parse(AutoAnnotateConfig, to_dict(), ...)` gives an equal config."""
        return json.loads(json.dumps(asdict(self)))

    def check(self, path: str) -> None:
        import torch  # the device string is torch's to judge; an auto build needs torch anyway

        for key in ("gdino_config", "gdino_checkpoint", "gdino_text_encoder", "sam_checkpoint"):
            if not getattr(self, key):
                raise ConfigError(f"{path}.{key}: must not be empty")
        if (self.sam_model_type == "tiny") != (self.tiny_sam is not None):
            raise ConfigError(f"{path}.tiny_sam: required for sam_model_type 'tiny' and only for it")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ConfigError(f"{path}.device: {self.device!r} is not a torch device ({err})") from None

    def check_files(self, path: str) -> None:
        """The weights are local files (read by every annotator actor): missing ones are named before any work."""
        for key, exists in (("gdino_config", Path.is_file), ("gdino_checkpoint", Path.is_file),
                            ("gdino_text_encoder", Path.is_dir), ("sam_checkpoint", Path.is_file)):
            if not exists(Path(getattr(self, key))):
                raise ConfigError(f"{path}.{key}: {getattr(self, key)} not found")


@dataclass
class AutoStageConfig:
    """The `annotate_auto` stage: its models and the Ray actors that run them."""

    model: AutoAnnotateConfig | None = None  # required for mode `auto`
    num_gpus: float = 0.0  # per actor
    batch_size: int = 4  # images per model call
    concurrency: int = 1  # actors

    def check(self, path: str) -> None:
        # A GPU reserved for an annotator that runs on the CPU is a GPU wasted, silently.
        if self.num_gpus > 0 and self.model is not None and self.model.device == "cpu":
            raise ConfigError(f"{path}.num_gpus: {self.num_gpus} GPUs reserved but {path}.model.device is cpu")


@dataclass
class AnnotateConfig:
    mode: Literal["given", "auto"] = "given"
    auto: AutoStageConfig = field(default_factory=AutoStageConfig)

    def check(self, path: str) -> None:
        if self.mode != "auto":
            return  # the model may be configured for later, on a machine that has its weights
        if self.auto.model is None:
            raise ConfigError(f"{path}.auto.model: required for mode 'auto' (the fields of AutoAnnotateConfig)")
        missing = [name for name in ("groundingdino", "segment_anything") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"{path}.mode: 'auto' needs the packages {', '.join(missing)}")
        self.auto.model.check_files(f"{path}.auto.model")


@dataclass
class ScoreFilterConfig:
    """A score hook (pipelines/stages/scores.py): rows scoring below `min_score` are rejected as low_<name>."""

    name: str
    scorer: str  # package.module:Class, called on (images, captions) -> one score per image
    min_score: float
    args: dict[str, Any] = field(default_factory=dict)  # the class's constructor arguments

    def check(self, path: str) -> None:
        from pipelines.stages.scores import resolve_scorer  # imports the user's module: only when used

        if not re.fullmatch(r"[a-z0-9_]+", self.name):
            raise ConfigError(f"{path}.name: {self.name!r} must be lower-case letters, digits or _")
        resolve_scorer(self.scorer, f"{path}.scorer")


@dataclass
class FilterConfig:
    min_score: float = 0.3
    min_area_frac: float = 0.02
    max_area_frac: float = 0.8
    min_box_fill: float = 0.25  # mask pixels / box pixels
    max_box_aspect: float = 4.0
    max_containment: float = 0.8  # drop a box this much inside a larger one
    max_instance_iou: float = 0.7  # two masks this similar are one instance found twice
    min_subjects: PositiveInt = 1
    max_subjects: PositiveInt = 4
    min_image_side: int = 64
    max_image_aspect: float = 3.0
    dedupe: bool = True
    # Perceptual-hash near-duplicates across the whole build (pipelines/near_dupes.py): at most this
    # many of 64 bits apart is a duplicate of the earlier image. null: off.
    near_dupe_max_distance: int | None = None
    score_filters: list[ScoreFilterConfig] = field(default_factory=list)

    def check(self, path: str) -> None:
        if self.min_subjects > self.max_subjects:
            raise ConfigError(f"{path}.min_subjects: larger than max_subjects")
        if not 0 <= self.min_area_frac <= self.max_area_frac <= 1:
            raise ConfigError(f"{path}.min_area_frac: need 0 <= min_area_frac <= max_area_frac <= 1")
        if self.near_dupe_max_distance is not None and not 0 <= self.near_dupe_max_distance < 32:
            raise ConfigError(f"{path}.near_dupe_max_distance: must be 0..31 bits (or null: off)")
        if len({f.name for f in self.score_filters}) < len(self.score_filters):
            raise ConfigError(f"{path}.score_filters: names must be unique (they name the rejections)")


@dataclass
class RefsConfig:
    margin: float = 0.1  # of the box's longer side, on each side
    max_side: int = 512  # larger crops are downscaled


@dataclass
class VideoConfig:
    sample_fps: PositiveFloat = 4.0
    cut_threshold: float = 0.4  # colour-histogram distance between consecutive frames
    iou_weight: float = 0.5  # track link score = w * mask IoU + (1 - w) * appearance
    min_link_score: float = 0.45
    min_appearance: float = 0.6
    max_missed_frames: int = 2
    min_gap_s: float = 0.5
    max_pair_iou: float = 0.9
    min_pair_quality: float = 0.6
    max_pairs_per_scene: PositiveInt = 4
    max_frames_per_scene: PositiveInt = 32  # kept evenly spread over a scene of any length: linear-time videos


@dataclass
class ShardsConfig:
    images_per_shard: PositiveInt = 32
    videos_per_shard: PositiveInt = 4
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 95


@dataclass
class RayConfig:
    num_cpus: int | None = None  # only for a local cluster this script starts itself


@dataclass
class DataConfig:
    out_dir: str = "data/shards"
    toyworld: ToyworldConfig = field(default_factory=ToyworldConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    refs: RefsConfig = field(default_factory=RefsConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self, path: str) -> None:
        # Sources are a tagged union (`type`), checked here against the source registry. Names are
        # unique across both kinds: a name starts every sample key, and training reads both kinds.
        names: set[str] = set()
        for kind, media in (("unpaired", "image"), ("paired", "video")):
            parsed = []
            for i, raw in enumerate(getattr(self.sources, kind)):
                p = f"{path}.sources.{kind}[{i}]"
                cfg = parse_source(raw, p)
                if SOURCE_TYPES[cfg.type][1].media != media:
                    raise ConfigError(f"{p}.type: a {cfg.type} source gives {SOURCE_TYPES[cfg.type][1].media}s;"
                                      f" {kind} shards need {media}s")
                if cfg.name in names:
                    raise ConfigError(f"{p}.name: {cfg.name!r} used twice (names start the sample keys)")
                names.add(cfg.name)
                parsed.append(cfg)
            setattr(self.sources, kind, parsed)


def parse_source(raw: Any, path: str) -> Any:
    if not isinstance(raw, dict) or "type" not in raw:
        raise ConfigError(f"{path}.type: required key is missing")
    if raw["type"] not in SOURCE_TYPES:
        raise ConfigError(f"{path}.type: {raw['type']!r} is not one of {sorted(SOURCE_TYPES)}")
    cfg = parse(SOURCE_TYPES[raw["type"]][0], raw, path)
    if not re.fullmatch(r"[A-Za-z0-9_]+", cfg.name):
        raise ConfigError(f"{path}.name: {cfg.name!r} must be letters, digits or _ (it starts every key)")
    return cfg


def load_data_config(params_path: str, overrides: Sequence[tuple[str, str]] = ()) -> DataConfig:
    """Read params.yaml's `data` section, apply `(dotted key below data, YAML value)` overrides, validate."""
    data = read_section(params_path, "data")
    if data is None:
        raise ConfigError(f"--params: {params_path} has no `data` section")
    return parse_data_config(data, overrides)


def parse_data_config(data: Any, overrides: Sequence[tuple[str, str]] = ()) -> DataConfig:
    model = data.get("annotate", {}).get("auto", {}).get("model") if isinstance(data, dict) else None
    if model == {}:  # how params.yaml said "no model" before the field had a type
        data = {**data, "annotate": {**data["annotate"], "auto": {**data["annotate"]["auto"], "model": None}}}
    return parse(DataConfig, data, "data", overrides)


def params_hash(cfg: DataConfig, kind: str) -> str:
    """Hash of everything that decides the content of `kind` shards (not where or how fast they are built)."""
    content = {
        "version": PIPELINE_VERSION,
        "sources": [asdict(source) for source in getattr(cfg.sources, kind)],
        "decode": asdict(cfg.decode),
        "annotate": {"mode": cfg.annotate.mode,
                     "model": cfg.annotate.auto.model.to_dict() if cfg.annotate.mode == "auto" else None},
        "filter": asdict(cfg.filter),
        "refs": asdict(cfg.refs),
        "video": asdict(cfg.video) if kind == "paired" else None,
        "shards": asdict(cfg.shards),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
