from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines.config import PIPELINE_VERSION, ShardsConfig
from pipelines.shards.storage import ShardStore
from pipelines.shards.writer import WriteShard
from pipelines.stages.encode import EncodeSamples
from tests.pipelines.helpers import png_array, read_samples


def sample_rows():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = [np.zeros((48, 64), bool), np.zeros((48, 64), bool)]
    masks[0][5:20, 5:30] = True
    masks[1][25:45, 30:60] = True
    subjects = [{"label": f"thing{i}", "bbox": [1.0, 2.0, 3.5, 4.0], "score": 0.912345, "area_frac": 0.1, "mask": m,
                 "ref": rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "refmask": m[:20, :20].copy(),
                 "ref_from": "self", "identity": i} for i, m in enumerate(masks)]
    return {"image": [img, None], "caption": ["two things", "x"], "subjects": [subjects, None],
            "source_id": ["a.png", "b.jpg"], "passthrough": [None, None], "reject": [None, "truncated"],
            "dropped": [["small_area"], None]}


def test_every_field_round_trips_through_the_plain_webdataset_reader(tmp_path):
    rows = sample_rows()
    img, subjects = rows["image"][0], [dict(s) for s in rows["subjects"][0]]
    rows = EncodeSamples("src", "unpaired", "hash123", ShardsConfig(image_format="png"))(rows)
    spec = {"shard": 7, "source": "src", "kind": "unpaired", "params_hash": "hash123",
            "pipeline_version": PIPELINE_VERSION}
    stats = WriteShard(str(tmp_path))(spec, rows, {"decode": 0.5})
    (s,) = read_samples(tmp_path)
    assert s["__key__"] == "src-000007-000000"
    np.testing.assert_array_equal(png_array(s["png"]), img)
    meta = json.loads(s["json"])
    assert meta["caption"] == "two things" and (meta["width"], meta["height"]) == (64, 48)
    assert meta["kind"] == "unpaired" and meta["source"] == "src" and meta["source_id"] == "a.png"
    assert meta["params_hash"] == "hash123" and meta["pipeline_version"] == PIPELINE_VERSION
    assert [x["label"] for x in meta["subjects"]] == ["thing0", "thing1"]
    assert meta["num_subjects"] == 2
    assert meta["subjects"][0] == {"label": "thing0", "bbox": [1.0, 2.0, 3.5, 4.0], "score": 0.9123,
                                   "area_frac": 0.1, "ref_from": "self", "identity": 0, "ref_tile": [0, 0, 20, 20]}
    # Subjects stacked in fixed members: masks top to bottom (1 bit), references left to right.
    masks = png_array(s["masks.png"])
    assert masks.dtype == bool and masks.shape == (2 * 48, 64)
    refs, refmasks = png_array(s["refs.png"]), png_array(s["refmasks.png"])
    assert refs.shape == (20, 40, 3) and refmasks.shape == (20, 40) and refmasks.dtype == bool
    for i, sub in enumerate(subjects):
        np.testing.assert_array_equal(masks[48 * i : 48 * (i + 1)], sub["mask"])
        np.testing.assert_array_equal(refs[:, 20 * i : 20 * (i + 1)], sub["ref"])
        np.testing.assert_array_equal(refmasks[:, 20 * i : 20 * (i + 1)], sub["refmask"])
    # stats: every input accounted for, hashes of what is in the tar
    assert stats["inputs"] == 2 and stats["written"] == 1 and stats["rejected"] == {"truncated": 1}
    assert stats["dropped"] == {"small_area": 1} and stats["samples"] == 1
    assert set(stats["member_sha256"]) == {f"src-000007-000000.{ext}" for ext in
                                          ["png", "json", "masks.png", "refs.png", "refmasks.png"]}
    names = os.listdir(tmp_path)
    assert {"000007.stats.json", "000007.tar"} <= set(names) and not [n for n in names if n.endswith(".tmp")]


def test_rewriting_a_shard_gives_identical_bytes(tmp_path):
    spec = {"shard": 0, "source": "s", "kind": "unpaired", "params_hash": "h", "pipeline_version": PIPELINE_VERSION}
    digests = []
    for _ in range(2):
        rows = EncodeSamples("s", "unpaired", "h", ShardsConfig())(sample_rows())
        digests.append(WriteShard(str(tmp_path))(spec, rows, {})["tar_sha256"])
    assert digests[0] == digests[1]


def test_a_crash_while_writing_publishes_nothing(tmp_path):
    class Boom(dict):
        def items(self):
            raise RuntimeError("killed")

    rows = EncodeSamples("s", "unpaired", "h", ShardsConfig())(sample_rows())
    rows["members"][0] = [Boom(rows["members"][0][0])]
    spec = {"shard": 3, "source": "s", "kind": "unpaired", "params_hash": "h", "pipeline_version": PIPELINE_VERSION}
    with pytest.raises(RuntimeError):
        WriteShard(str(tmp_path))(spec, rows, {})
    store = ShardStore(str(tmp_path))
    assert store.done() == {} and not any(n.endswith(".tar") for n in os.listdir(tmp_path))
    leftovers = store.clean_temps({3})
    assert len(leftovers) == 1 and os.listdir(tmp_path) == []


def test_store_accepts_file_urls(tmp_path):
    store = ShardStore(f"file://{tmp_path}/deep/er")
    store.makedirs()
    store.write_json(1, "000001.stats.json", {"shard": 1})
    assert store.done() == {1: {"shard": 1}}
    assert os.path.exists(tmp_path / "deep" / "er" / "000001.stats.json")
