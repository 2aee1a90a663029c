"""`auto` annotation: GroundingDINO boxes for a caption's noun phrases (or a label list), then SAM masks
from those boxes.

`AutoAnnotator` loads both models once (one per Ray actor) and maps a batch (dict of columns) to the same
batch plus `subjects` (per row a list of `{label, bbox, score, mask, mask_score}`) and `annotate_error`
(None, or an `AnnotateError(reason, detail)` with reason in `bad_image`, `no_labels`, `detector_failed`,
`segmenter_failed`: the build counts rejections by reason and keeps the detail for the status table).

GroundingDINO runs batched through its own forward (one caption per image), grouping images that resize to
the same size; SAM runs `set_image` per image, then one `predict_torch` with all boxes of that image.

groundingdino and segment_anything are imported where models are built or run, so code that only needs
the config or the label helpers (e.g. a `given` build) does not import them and their warnings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_convert
from torchvision.transforms.functional import normalize, to_tensor

from pipelines.config import AutoAnnotateConfig, TinySamSizes

# Older transformers saved this buffer; the official GroundingDINO checkpoint still carries it.
_GDINO_IGNORED_KEYS = frozenset({"bert.embeddings.position_ids"})


# --- labels and prompt -------------------------------------------------------------------------------------
# Rule-based noun-phrase chunking: a phrase is a run of words between closed-class words (determiners,
# prepositions, conjunctions, pronouns, auxiliaries, a list of common verbs), punctuation and numbers.
# Limits (no POS tagger): a verb not in the lists stays in its phrase ("a dog chases a cat" -> "dog chases",
# "cat"); "-ing"/"-ed" words of 5+ letters count as participles except a short list of nouns, so an unlisted
# one is dropped ("a bowl of stuffing" -> "bowl"); plurals are kept as written; English only.
_STOP_WORDS = frozenset(
    """a an the this that these those his her its their our my your some any each every no another both all
    several many few much more most one two three four five six seven eight nine ten dozen
    in on at of with by for from to into onto near under over above below behind beside besides between
    across along around through against inside outside toward towards among about up down off out upon
    within without beneath underneath atop via past beyond like as next
    and or but nor while where which who whom whose than if then so because when
    it they he she we you i them him us me there here itself themselves
    is are was were be been being am has have had do does did can could will would shall should may might
    must not very too also just only together alone
    sits sit sat stands stand stood lies lie lay holds hold held looks look wears wear plays play runs run
    walks walk rides ride flies fly swims swim eats eat jumps jump rests rest waits wait
    photo photograph picture image illustration render closeup close-up shot view scene front top bottom left right
    middle center centre side edge corner background foreground""".split()
)
_PARTICIPLE_NOUNS = frozenset(
    """building ceiling clothing ring king wing string swing thing spring evening morning pudding wedding
    earring railing sibling duckling painting drawing stocking bedding icing awning""".split()
)
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def _is_participle(word: str) -> bool:
    if word in _PARTICIPLE_NOUNS:
        return False
    return (word.endswith("ing") and len(word) > 4) or (word.endswith("ed") and len(word) > 4)


def extract_noun_phrases(caption: str, max_words: int = 3) -> list[str]:
    """Noun phrases of a caption, in order, deduplicated; each keeps its last `max_words` words (the head)."""
    phrases: list[str] = []
    current: list[str] = []

    def close() -> None:
        while current and _is_participle(current[-1]):  # "a dog running" -> "dog"
            current.pop()
        if current:
            phrase = " ".join(current[-max_words:])
            if phrase not in phrases:
                phrases.append(phrase)
        current.clear()

    for match in _TOKEN.finditer(re.sub(r"'s\b", " ,", caption.lower())):  # a possessive ends a phrase
        word = match.group()
        if not word[0].isalnum() or word in _STOP_WORDS or word.isdigit():
            close()
        elif current and _is_participle(word):  # a participle after the noun starts a verb phrase
            close()
        else:
            current.append(word)
    close()
    return phrases


def clean_labels(labels: Iterable[str]) -> list[str]:
    """Lower-case, strip GroundingDINO's separator '.', collapse spaces, drop empties and duplicates."""
    out: list[str] = []
    for label in labels:
        text = " ".join(str(label).lower().replace(".", " ").split())
        if text and text not in out:
            out.append(text)
    return out


def build_prompt(labels: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO text prompt "a . b . c ." and each label's character span in it."""
    spans: list[tuple[int, int]] = []
    start = 0
    for label in labels:
        spans.append((start, start + len(label)))
        start += len(label) + len(" . ")
    return " . ".join(labels) + " .", spans


def label_token_map(tokenizer: Any, prompt: str, spans: Sequence[tuple[int, int]], max_text_len: int) -> torch.Tensor:
    """(labels, max_text_len) bool: which token positions of GroundingDINO's logits belong to each label.

    Mapping detections back to labels through token positions (as GroundingDINO's own token-span mode
    does) avoids decoding phrases to strings and string-matching them, which breaks when a phrase covers
    tokens of two labels.
    """
    encoding = tokenizer(prompt)
    token_map = torch.zeros(len(spans), max_text_len, dtype=torch.bool)
    for row, (start, end) in enumerate(spans):
        for char in range(start, end):
            token = encoding.char_to_token(char)
            if token is not None and token < max_text_len:  # the model truncates text beyond max_text_len
                token_map[row, token] = True
    return token_map


def assign_labels(
    probs: torch.Tensor, token_map: torch.Tensor, box_threshold: float, text_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick a label per query from token probabilities `probs` (queries, max_text_len).

    As in GroundingDINO's `predict`, tokens above `text_threshold` form a query's phrase; its label is the
    one with the largest share of its tokens in the phrase (ties: higher token score). The query's score is
    its best token probability within that label and must exceed `box_threshold`.
    Returns (query indices, label indices, scores) of the kept queries.
    """
    in_label = token_map[None].float()  # 1, L, T
    label_scores = (probs[:, None, :] * in_label).amax(-1)  # Q, L
    share = ((probs[:, None, :] > text_threshold).float() * in_label).sum(-1) / in_label.sum(-1).clamp(min=1)
    best_share = share.amax(-1, keepdim=True)
    label = torch.where(share == best_share, label_scores, -1.0).argmax(-1)
    score = label_scores.gather(1, label[:, None])[:, 0]
    keep = (best_share[:, 0] > 0) & (score > box_threshold)
    return keep.nonzero()[:, 0], label[keep], score[keep]


# --- models ------------------------------------------------------------------------------------------------
def load_weights(model: torch.nn.Module, path: str, ignored_keys: Iterable[str] = ()) -> None:
    """Load .safetensors or a .pth state dict (`weights_only=True`); any missing, unexpected or mis-shaped
    key is an error, except `ignored_keys` (known leftovers in published checkpoints)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_model  # handles tensors the model shares between modules

            missing, unexpected = load_model(model, path, strict=False)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state.get("model"), Mapping):  # GroundingDINO's published layout
                state = state["model"]
            state = {k.removeprefix("module."): v for k, v in state.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise ValueError(f"{path} does not match the model: {err}") from err
    unexpected = sorted(set(unexpected) - set(ignored_keys))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {sorted(missing)[:8]}, unexpected {unexpected[:8]}")


def build_tiny_sam(sizes: TinySamSizes) -> torch.nn.Module:
    """A `Sam` from segment_anything's own modules with explicit (small) sizes; same wiring as the registry."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = sizes.image_size // sizes.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=sizes.image_size, patch_size=sizes.patch_size, embed_dim=sizes.encoder_embed_dim,
            depth=sizes.encoder_depth, num_heads=sizes.encoder_num_heads, mlp_ratio=4.0,
            out_chans=sizes.prompt_embed_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=sizes.window_size,
            global_attn_indexes=sizes.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=sizes.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(sizes.image_size, sizes.image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=sizes.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=sizes.decoder_depth, embedding_dim=sizes.prompt_embed_dim,
                mlp_dim=sizes.decoder_mlp_dim, num_heads=sizes.decoder_num_heads,
            ),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=sizes.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_groundingdino(config: AutoAnnotateConfig) -> torch.nn.Module:
    """GroundingDINO from its python config, with the text encoder from a local directory (no hub)."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(config.gdino_config)
    args.text_encoder_type = config.gdino_text_encoder
    args.device = config.device
    # Activation checkpointing only saves training memory; at inference it just warns.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    return build_model(args)


def build_sam(config: AutoAnnotateConfig) -> torch.nn.Module:
    """SAM of `sam_model_type` (or the tiny sizes), randomly initialised."""
    from segment_anything import sam_model_registry

    if config.tiny_sam is not None:
        return build_tiny_sam(config.tiny_sam)
    return sam_model_registry[config.sam_model_type](checkpoint=None)


def build_models(config: AutoAnnotateConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """GroundingDINO and SAM with the config's checkpoints loaded (strictly: every key must match)."""
    gdino = build_groundingdino(config)
    load_weights(gdino, config.gdino_checkpoint, ignored_keys=_GDINO_IGNORED_KEYS)
    sam = build_sam(config)
    load_weights(sam, config.sam_checkpoint)
    return gdino, sam


def _check_image(image: Any, min_side: int) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{type(image).__name__}, expected a numpy array")
    if image.dtype != np.uint8:
        raise ValueError(f"dtype {image.dtype}, expected uint8")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"shape {image.shape}, expected HxWx3")
    if min(image.shape[:2]) < min_side:
        raise ValueError(f"{image.shape[0]}x{image.shape[1]} is below min_image_side={min_side}")
    return np.ascontiguousarray(image)


def clip_mask_to_box(mask: np.ndarray, box: Sequence[float], margin: float) -> np.ndarray:
    """Clear mask pixels outside `box` grown by `margin` of its size on each side."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    rows = slice(max(0, math.floor(y0 - dy)), max(0, math.ceil(y1 + dy)))
    cols = slice(max(0, math.floor(x0 - dx)), max(0, math.ceil(x1 + dx)))
    inside = np.zeros_like(mask, dtype=bool)
    inside[rows, cols] = True
    return mask & inside


class AnnotateError(NamedTuple):
    """Why a row got no subjects: `reason` is what the build's stats count, `detail` says what happened."""

    reason: str
    detail: str

    @classmethod
    def from_exception(cls, reason: str, err: BaseException) -> AnnotateError:
        return cls(reason, f"{type(err).__name__}: {err}")


@dataclass
class _Row:
    index: int
    image: np.ndarray
    labels: list[str]


@dataclass
class _Detection:
    label: str
    box: list[float]  # x0, y0, x1, y1 in input-image pixels
    score: float


class AutoAnnotator:
    """Batch stage: `subjects` from GroundingDINO boxes + SAM masks. Models load once, from local files."""

    def __init__(self, config: AutoAnnotateConfig,
                 models: tuple[torch.nn.Module, torch.nn.Module] | None = None) -> None:
        """`models`: (GroundingDINO, Sam) to use as they are, instead of building them and loading the
        config's checkpoints (benchmarks/annotate.py: random weights at the real architectures)."""
        from groundingdino.util.misc import nested_tensor_from_tensor_list
        from segment_anything import SamPredictor

        self.config = config
        self.device = torch.device(config.device)
        self._nested = nested_tensor_from_tensor_list
        self.gdino, sam = models if models is not None else build_models(config)
        self.gdino.eval().to(self.device)
        if not self.gdino.tokenizer.is_fast:
            raise ValueError(f"gdino_text_encoder={config.gdino_text_encoder} needs a fast tokenizer (tokenizer.json)")
        self.sam = SamPredictor(sam.eval().to(self.device))

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        images, captions = batch["image"], batch["caption"]
        given = batch.get("labels")
        subjects: list[list[dict[str, Any]]] = [[] for _ in range(len(images))]
        errors: list[AnnotateError | None] = [None] * len(images)
        rows: list[_Row] = []
        for i, image in enumerate(images):
            try:
                image = _check_image(image, self.config.min_image_side)
            except ValueError as err:
                errors[i] = AnnotateError("bad_image", str(err))
                continue
            row_labels = given[i] if given is not None else None
            if row_labels is not None:
                labels = clean_labels([row_labels] if isinstance(row_labels, str) else row_labels)
                if not labels:
                    errors[i] = AnnotateError("no_labels", "the given label list is empty")
                    continue
            else:
                labels = extract_noun_phrases(captions[i] if isinstance(captions[i], str) else "")
                if not labels:
                    errors[i] = AnnotateError("no_labels", "no noun phrase in the caption")
                    continue
            rows.append(_Row(i, image, labels[: self.config.max_labels]))

        for row, detections in zip(rows, self._detect_all(rows), strict=True):
            if isinstance(detections, AnnotateError):
                errors[row.index] = detections
                continue
            try:
                subjects[row.index] = self._segment(row.image, detections)
            except Exception as err:  # one row's failure must not lose the batch
                errors[row.index] = AnnotateError.from_exception("segmenter_failed", err)
        return {**batch, "subjects": subjects, "annotate_error": errors}

    def _detect_all(self, rows: list[_Row]) -> list[list[_Detection] | AnnotateError]:
        """Detections, or a `detector_failed` error, per row.

        Only images with the same resized size share a forward: padding changes a smaller image's backbone
        features, so its boxes would otherwise depend on the images it happened to be batched with.
        """
        out: list[list[_Detection] | AnnotateError] = [[] for _ in rows]
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for k, row in enumerate(rows):
            try:
                tensor = self._preprocess(row.image)
            except Exception as err:  # e.g. an extreme aspect ratio that resizes to zero pixels
                out[k] = AnnotateError.from_exception("detector_failed", err)
                continue
            groups.setdefault(tuple(tensor.shape), []).append((k, tensor))
        size = self.config.gdino_batch_size
        for group in groups.values():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                results: list[list[_Detection] | AnnotateError]
                try:
                    results = list(self._detect([rows[k] for k, _ in chunk], [t for _, t in chunk]))
                except Exception:  # rerun row by row so only a failing row is rejected
                    results = []
                    for k, tensor in chunk:
                        try:
                            results += self._detect([rows[k]], [tensor])
                        except Exception as err:
                            results.append(AnnotateError.from_exception("detector_failed", err))
                for (k, _), result in zip(chunk, results, strict=True):
                    out[k] = result
        return out

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        # GroundingDINO's own inference resize, called directly: RandomResize would draw from `random`.
        from groundingdino.datasets.transforms import resize

        resized, _ = resize(Image.fromarray(image), None, self.config.gdino_image_size, self.config.gdino_max_image_size)
        return normalize(to_tensor(resized), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    @torch.inference_mode()
    def _detect(self, rows: list[_Row], tensors: list[torch.Tensor]) -> list[list[_Detection]]:
        prompts, token_maps = [], []
        for row in rows:
            prompt, spans = build_prompt(row.labels)
            prompts.append(prompt)
            token_maps.append(label_token_map(self.gdino.tokenizer, prompt, spans, self.gdino.max_text_len))
        # Boxes come out normalised to each image's own size.
        outputs = self.gdino(self._nested(tensors).to(self.device), captions=prompts)
        probs = outputs["pred_logits"].sigmoid().float().cpu()
        boxes = outputs["pred_boxes"].float().cpu()
        return [
            self._select(probs[k], boxes[k], token_maps[k], row.labels, row.image.shape[:2])
            for k, row in enumerate(rows)
        ]

    def _select(
        self, probs: torch.Tensor, boxes_cxcywh: torch.Tensor, token_map: torch.Tensor, labels: list[str],
        image_hw: tuple[int, int],
    ) -> list[_Detection]:
        cfg = self.config
        query, label, score = assign_labels(probs, token_map, cfg.box_threshold, cfg.text_threshold)
        h, w = image_hw
        boxes = box_convert(boxes_cxcywh[query], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        valid = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        boxes, label, score = boxes[valid], label[valid], score[valid]
        kept: list[_Detection] = []
        per_label: dict[int, int] = {}
        for i in batched_nms(boxes, score, label, cfg.nms_iou).tolist():  # sorted by score, descending
            lab = int(label[i])
            if per_label.get(lab, 0) < cfg.max_boxes_per_label:
                per_label[lab] = per_label.get(lab, 0) + 1
                kept.append(_Detection(labels[lab], boxes[i].tolist(), float(score[i])))
        return kept

    @torch.inference_mode()
    def _segment(self, image: np.ndarray, detections: list[_Detection]) -> list[dict[str, Any]]:
        if not detections:
            return []
        self.sam.set_image(image)
        boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
        boxes = self.sam.transform.apply_boxes_torch(boxes, image.shape[:2]).to(self.device)
        masks, mask_scores, _ = self.sam.predict_torch(None, None, boxes=boxes, multimask_output=False)
        masks_np, mask_scores_np = masks[:, 0].cpu().numpy(), mask_scores[:, 0].float().cpu().numpy()
        self.sam.reset_image()
        subjects = []
        for det, mask, mask_score in zip(detections, masks_np, mask_scores_np, strict=True):
            if self.config.mask_box_margin is not None:
                mask = clip_mask_to_box(mask, det.box, self.config.mask_box_margin)
            if mask.any():  # an empty mask is no subject
                subjects.append(
                    {"label": det.label, "bbox": det.box, "score": det.score, "mask": mask,
                     "mask_score": float(mask_score)}
                )
        return subjects
