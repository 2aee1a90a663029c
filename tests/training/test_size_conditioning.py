"""SDXL's size conditioning comes from the shard json: the input's original size and the pipeline's crop."""

from __future__ import annotations

import random

import numpy as np
import webdataset as wds

from pipelines.config import ShardsConfig
from pipelines.shards.contract import sample_key
from pipelines.stages.encode import sample_members
from pipelines.stages.resize import Geometry
from training.data.sample import DecodeSample, SampleConfig


def test_time_ids_hold_the_original_size_and_the_pipeline_crop(tmp_path):
    # A 256x128 input, resized to 128x64 by the pipeline, then its centre 64x64 square kept.
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    subject = {"label": "x", "bbox": [10.0, 10.0, 30.0, 30.0], "score": 1.0, "area_frac": 0.1, "mask": mask,
               "ref": image[8:32, 8:32].copy(), "refmask": mask[8:32, 8:32].copy(), "ref_from": "self"}
    sample = {"image": image, "caption": "x", "subjects": [subject], "source_id": "a", "passthrough": None,
              "geometry": Geometry(256, 128, 128, 64, 32, 0, 64, 64)}
    members = sample_members(sample, "t", "unpaired", "h", ShardsConfig(image_format="png"))
    with wds.TarWriter(str(tmp_path / "000000.tar")) as sink:
        sink.write({"__key__": sample_key("t", 0, 0), **members})
    (raw,) = list(wds.WebDataset(str(tmp_path / "000000.tar"), shardshuffle=False))
    out = DecodeSample(SampleConfig(resolution=32, clip_size=16, ref_size=32))(raw, random.Random(0), train=False)
    # Training halves the 64x64 image: the pipeline's crop at x=32 sits at x=16 of that frame.
    assert out["time_ids"].tolist() == [128, 256, 0, 16, 32, 32]
