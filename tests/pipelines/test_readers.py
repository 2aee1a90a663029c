"""The ecosystem's webdataset readers load the pipeline's shards: `datasets`, `ray.data` and `webdataset`.

Shards are built by the pipeline (local runner) from toyworld, whose images have 1 to 4 subjects,
so a shard mixes subject counts. What each reader returns is decoded with the contract module and
compared with what the pipeline was given (the COCO masks of the input) and with the tar's members
decoded by hand from the layout that docs/data_build.md documents.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from pipelines.build import run_build
from pipelines.config import parse_data_config
from pipelines.masks import segmentation_to_mask
from pipelines.shards.contract import decode_subjects
from tests.pipelines.helpers import toy_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, toy_dir):
    out = tmp_path_factory.mktemp("readers")
    params = toy_params(toy_dir, out)
    run_build(parse_data_config(params["data"]), "unpaired", str(out), runner="local")
    urls = sorted(glob.glob(str(out / "unpaired" / "*.tar")))
    assert urls
    return urls, params


def _by_hand(urls: list[str]) -> dict[str, dict]:
    """Per key: json, masks (N, H, W) and references, split from the raw PNG members by the documented
    layout (masks top to bottom; references left to right at their `ref_tile`)."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members[key][ext] = tar.extractfile(m).read()
    out = {}
    for key, mem in members.items():
        meta = json.loads(mem["json"])
        h, w, n = meta["height"], meta["width"], meta["num_subjects"]
        stack = np.asarray(Image.open(io.BytesIO(mem["masks.png"])).convert("L")) > 127
        refs = np.asarray(Image.open(io.BytesIO(mem["refs.png"])).convert("RGB"))
        refmasks = np.asarray(Image.open(io.BytesIO(mem["refmasks.png"])).convert("L")) > 127
        tiles = [s["ref_tile"] for s in meta["subjects"]]
        out[key] = {"meta": meta, "masks": [stack[i * h : (i + 1) * h] for i in range(n)], "width": w,
                    "refs": [refs[y0:y1, x0:x1] for x0, y0, x1, y1 in tiles],
                    "refmasks": [refmasks[y0:y1, x0:x1] for x0, y0, x1, y1 in tiles], "names": set(mem)}
    return out


def _check(samples: list[dict], expected: dict[str, dict], reader: str) -> None:
    assert sorted(s["__key__"] for s in samples) == sorted(expected), reader
    for s in samples:
        exp = expected[s["__key__"]]
        meta = s["json"] if isinstance(s["json"], dict) else json.loads(s["json"])
        got = decode_subjects(s, meta)
        assert len(got.refs) == exp["meta"]["num_subjects"], reader
        for i in range(len(got.refs)):
            np.testing.assert_array_equal(got.masks[i], exp["masks"][i], err_msg=reader)
            np.testing.assert_array_equal(got.refs[i], exp["refs"][i], err_msg=reader)
            np.testing.assert_array_equal(got.ref_masks[i], exp["refmasks"][i], err_msg=reader)


def test_every_sample_has_the_same_members_and_masks_are_the_inputs(built, toy_dir):
    urls, _ = built
    expected = _by_hand(urls)
    assert {frozenset(e["names"]) for e in expected.values()} == {frozenset(
        {"jpg", "json", "masks.png", "refs.png", "refmasks.png"})}
    for url in urls:  # a shard mixes subject counts
        counts = {e["meta"]["num_subjects"] for k, e in expected.items() if k.split("-")[1] == url[-10:-4]}
        assert len(counts) > 1, url
    with open(os.path.join(toy_dir, "images", "annotations.json")) as f:
        coco = json.load(f)
    images = {im["file_name"]: im for im in coco["images"]}
    anns = defaultdict(list)
    for a in coco["annotations"]:
        anns[a["image_id"]].append(a)
    for e in expected.values():
        im = images[e["meta"]["source_id"]]
        given = {a["identity"]: a for a in anns[im["id"]]}
        for sub, mask in zip(e["meta"]["subjects"], e["masks"], strict=True):
            np.testing.assert_array_equal(
                mask, segmentation_to_mask(given[sub["identity"]]["segmentation"], im["height"], im["width"]))
            assert e["refmasks"][e["meta"]["subjects"].index(sub)].sum() == mask.sum()  # whole subject in its ref


def test_webdataset_reader(built):
    import webdataset as wds

    urls, _ = built
    _check(list(wds.WebDataset(urls, shardshuffle=False)), _by_hand(urls), "webdataset")


def test_datasets_reader(built, tmp_path):
    import datasets

    urls, _ = built
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    _check(list(ds), _by_hand(urls), "datasets")


def test_ray_data_reader(built):
    import ray

    urls, _ = built
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = ray.data.read_webdataset(urls).take_all()
    finally:
        ray.shutdown()
    _check(rows, _by_hand(urls), "ray.data")
