"""Stage 6a: sample rows -> webdataset members (bytes), in the shard contract's layout.

Members per sample (pipelines/shards/contract.py): `jpg` or `png` (target), `json`, and the subjects
stacked in `masks.png`, `refs.png`, `refmasks.png`, the same names whatever the subject count. Keys
are given by the writer. Adds `members` to each input row: a list of member dicts (one per sample; a
video row can carry several).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.batch import Batch, ensure_column, live_rows
from pipelines.config import PIPELINE_VERSION, ShardsConfig
from pipelines.shards.contract import JSON, encode_subject_members
from pipelines.stages.resize import identity_geometry

SUBJECT_META = ("label", "bbox", "score", "area_frac", "ref_from", "identity", "ref_identity", "match_score",
                "mask_iou")
PAIR_META = ("frame_a", "frame_b", "time_gap_s", "pair_quality")


def encode_rgb(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def sample_members(sample: dict[str, Any], source: str, kind: str, params_hash: str, cfg: ShardsConfig
                   ) -> dict[str, bytes]:
    image = sample["image"]
    h, w = image.shape[:2]
    members: dict[str, bytes] = {}
    if sample.get("passthrough") is not None and cfg.image_format == "jpg":
        members["jpg"] = sample["passthrough"]  # a plain RGB JPEG: keep the original bytes, no re-encode loss
    else:
        members[cfg.image_format] = encode_rgb(image, cfg.image_format, cfg.jpeg_quality)
    stacked, tiles = encode_subject_members([s["mask"] for s in sample["subjects"]],
                                            [s["ref"] for s in sample["subjects"]],
                                            [s["refmask"] for s in sample["subjects"]])
    members.update(stacked)
    subjects = [{**{k: _round(s[k]) for k in SUBJECT_META if k in s}, "ref_tile": tile}
                for s, tile in zip(sample["subjects"], tiles, strict=True)]
    meta = {
        "caption": sample["caption"], "width": w, "height": h, "source": source, "source_id": sample["source_id"],
        "kind": kind, "num_subjects": len(subjects), "subjects": subjects,
        "quality": {"min_score": _round(min(s["score"] for s in sample["subjects"])),
                    "min_area_frac": _round(min(s.get("area_frac", 0.0) for s in sample["subjects"]))},
        "pipeline_version": PIPELINE_VERSION, "params_hash": params_hash,
    }
    geometry = sample.get("geometry") or identity_geometry(w, h)
    meta.update(geometry.json_fields())
    if sample.get("scores"):  # score filters' values (stages/scores.py)
        meta["quality"]["scores"] = sample["scores"]
    meta.update({k: sample[k] for k in PAIR_META if k in sample})
    members[JSON] = json.dumps(meta, sort_keys=True).encode()
    return members


@dataclass
class EncodeSamples:
    source: str
    kind: str
    params_hash: str
    cfg: ShardsConfig

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "members", None)
        for i in live_rows(batch):
            if "samples" in batch:  # video rows: several samples each
                samples = batch["samples"][i]
            else:
                samples = [{k: batch[k][i] if k in batch else None
                            for k in ("image", "caption", "subjects", "source_id", "passthrough", "geometry",
                                      "scores")}]
            batch["members"][i] = [sample_members(s, self.source, self.kind, self.params_hash, self.cfg)
                                   for s in samples]
            # Pixels are encoded now: free them before the shard is written.
            for col in ("image", "samples", "subjects", "alpha", "passthrough", "geometry"):
                if col in batch:
                    batch[col][i] = None
        return batch
