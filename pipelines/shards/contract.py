"""The shard contract: member names, key format and the codecs of the stacked subject members.

The one definition shared by the writer (pipelines/stages/encode.py, pipelines/shards/writer.py),
the training reader (training/data/sample.py) and the tests; docs/data_build.md describes it.
`training/` imports this module and nothing else of `pipelines/`, so it depends only on numpy and
Pillow.

Every sample of a shard has the same member names, whatever its subject count, because the
`datasets` and `ray.data` webdataset readers build one schema per shard:
- `jpg` or `png` (one per build, `data.shards.image_format`): the target image, RGB;
- `json`: the metadata; `num_subjects` (= len(`subjects`)) tells how many subjects are stacked, and
  each subject's `ref_tile` [x0, y0, x1, y1] where its reference sits in the reference strips;
- `masks.png`: the instance masks in the target, stacked top to bottom (subject i in rows
  i*H .. (i+1)*H - 1 of a W x N*H image), a 1-bit grayscale PNG (masks are binary; 1 bit per
  pixel deflates to about 2/3 of 8-bit 0/255);
- `refs.png`: the reference crops side by side, left to right, top-aligned, RGB, black where no tile;
- `refmasks.png`: the reference masks, the same layout as `refs.png`, 1-bit.
Decoders accept the member as bytes (plain tar, `webdataset`), a PIL image (`datasets`) or a numpy
array (`ray.data.read_webdataset`), so any of those readers' samples can be decoded here.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

TARGET_EXTS: tuple[str, ...] = ("jpg", "png")
JSON = "json"
MASKS = "masks.png"
REFS = "refs.png"
REF_MASKS = "refmasks.png"
SUBJECT_MEMBERS: tuple[str, ...] = (MASKS, REFS, REF_MASKS)


class ContractError(ValueError):
    """A sample whose members do not follow the contract (missing, undecodable or misshapen)."""


def sample_key(source: str, shard: int, index: int) -> str:
    """`{source}-{shard:06d}-{index:06d}`: stable across reruns. Source names hold no '.', which
    webdataset readers take as the end of the key."""
    return f"{source}-{shard:06d}-{index:06d}"


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _array(value: Any, name: str) -> np.ndarray:
    """A member as a numpy array, from bytes, a PIL image or an array."""
    if isinstance(value, np.ndarray):
        return value
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(value)) as im:
                im.load()
                return np.asarray(im)
        if isinstance(value, Image.Image):
            return np.asarray(value)
    except Exception as err:  # Pillow raises many types for corrupt data
        raise ContractError(f"undecodable {name}") from err
    raise ContractError(f"missing {name}" if value is None else f"{name}: unexpected {type(value).__name__}")


def _binary(array: np.ndarray) -> np.ndarray:
    """A decoded 1-bit (bool) or 8-bit (0/255) grayscale mask as bool."""
    if array.ndim == 3:  # a reader that converted to RGB
        array = array[..., 0]
    return array > 127 if array.dtype != bool else array


def _target_ext(members: Mapping[str, Any]) -> str:
    for ext in TARGET_EXTS:
        if members.get(ext) is not None:
            return ext
    raise ContractError("no target image (jpg or png)")


# ---- subject masks ------------------------------------------------------------------------------


def encode_masks(masks: Sequence[np.ndarray]) -> bytes:
    """N HxW bool masks -> one W x N*H 1-bit PNG."""
    if not masks:
        raise ValueError("a sample has at least one subject")
    return _png(np.concatenate([np.asarray(m, dtype=bool) for m in masks], axis=0), "1")


def split_masks(value: Any, count: int, height: int, width: int) -> np.ndarray:
    """The decoded `masks.png` member -> (count, height, width) bool."""
    stack = _binary(_array(value, MASKS))
    if stack.shape != (count * height, width):
        raise ContractError(f"{MASKS} is {stack.shape[1]}x{stack.shape[0]}, expected {width}x{count * height} "
                            f"for {count} subject(s) of a {width}x{height} target")
    return stack.reshape(count, height, width)


# ---- references ---------------------------------------------------------------------------------


def encode_refs(refs: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]
                ) -> tuple[bytes, bytes, list[list[int]]]:
    """References (HxWx3 uint8) and their masks (HxW bool) -> (`refs.png`, `refmasks.png`, tiles):
    one strip each, tiles placed left to right, top-aligned; tile i is [x0, y0, x1, y1]."""
    if len(refs) != len(ref_masks) or not refs:
        raise ValueError("one reference mask per reference, at least one reference")
    height = max(r.shape[0] for r in refs)
    width = sum(r.shape[1] for r in refs)
    strip = np.zeros((height, width, 3), np.uint8)
    mask_strip = np.zeros((height, width), bool)
    tiles, x = [], 0
    for ref, mask in zip(refs, ref_masks, strict=True):
        h, w = ref.shape[:2]
        if mask.shape != (h, w):
            raise ValueError(f"reference mask {mask.shape} does not match its reference {(h, w)}")
        strip[:h, x : x + w] = ref
        mask_strip[:h, x : x + w] = mask
        tiles.append([x, 0, x + w, h])
        x += w
    return _png(strip, "RGB"), _png(mask_strip, "1"), tiles


def split_refs(refs_value: Any, masks_value: Any, tiles: Sequence[Sequence[int]]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The decoded `refs.png` and `refmasks.png` members -> per subject (reference RGB, mask bool)."""
    strip = _array(refs_value, REFS)
    if strip.ndim == 2:
        strip = np.repeat(strip[..., None], 3, axis=2)
    strip = strip[..., :3]
    mask_strip = _binary(_array(masks_value, REF_MASKS))
    if mask_strip.shape != strip.shape[:2]:
        raise ContractError(f"{REF_MASKS} and {REFS} differ in size")
    out = []
    for tile in tiles:
        x0, y0, x1, y1 = (int(v) for v in tile)
        if not (0 <= x0 < x1 <= strip.shape[1] and 0 <= y0 < y1 <= strip.shape[0]):
            raise ContractError(f"ref_tile {list(tile)} lies outside {REFS}")
        out.append((strip[y0:y1, x0:x1], mask_strip[y0:y1, x0:x1]))
    return out


# ---- whole samples ------------------------------------------------------------------------------


def encode_subject_members(masks: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                           ref_masks: Sequence[np.ndarray]) -> tuple[dict[str, bytes], list[list[int]]]:
    """The three stacked members of one sample, and each subject's `ref_tile` for its json entry."""
    refs_png, refmasks_png, tiles = encode_refs(refs, ref_masks)
    return {MASKS: encode_masks(masks), REFS: refs_png, REF_MASKS: refmasks_png}, tiles


@dataclass
class DecodedSubjects:
    masks: np.ndarray  # (N, H, W) bool, instance masks in the target
    refs: list[np.ndarray]  # N x (h_i, w_i, 3) uint8, un-augmented reference crops
    ref_masks: list[np.ndarray]  # N x (h_i, w_i) bool


def decode_subjects(members: Mapping[str, Any], meta: Mapping[str, Any]) -> DecodedSubjects:
    """The stacked members of one sample (bytes, PIL images or arrays) with its parsed json."""
    subjects = meta.get("subjects") or []
    count = int(meta.get("num_subjects", len(subjects)))
    if count != len(subjects) or count < 1:
        raise ContractError(f"num_subjects {count} but {len(subjects)} subject entries")
    missing = [m for m in SUBJECT_MEMBERS if members.get(m) is None]
    if missing:
        raise ContractError(f"missing member(s) {', '.join(missing)}")
    try:
        tiles = [s["ref_tile"] for s in subjects]
        height, width = int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError) as err:
        raise ContractError(f"json lacks {err}") from err
    masks = split_masks(members[MASKS], count, height, width)
    pairs = split_refs(members[REFS], members[REF_MASKS], tiles)
    return DecodedSubjects(masks, [r for r, _ in pairs], [m for _, m in pairs])


def target_member(members: Mapping[str, Any]) -> tuple[str, Any]:
    """(extension, value) of the target image member."""
    ext = _target_ext(members)
    return ext, members[ext]
