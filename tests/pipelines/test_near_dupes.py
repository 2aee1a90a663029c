"""Near-duplicates across the whole build (perceptual hashes) and the score-filter hooks."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipelines.build import run_build
from pipelines.config import ConfigError, parse_data_config
from pipelines.near_dupes import NearDuplicateIndex
from pipelines.stages.scores import ScoreImages
from tests.pipelines.helpers import read_samples, read_stats, toy_params


def test_index_finds_exactly_the_hashes_within_the_distance():
    rng = np.random.default_rng(0)
    stored = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    index = NearDuplicateIndex(4)
    for h in stored:
        index.add(h)
    for k in range(200):
        base = stored[k % len(stored)]
        flips = rng.choice(64, size=int(rng.integers(0, 8)), replace=False)
        query = base
        for bit in flips:
            query ^= 1 << int(bit)
        brute = [h for h in stored if bin(h ^ query).count("1") <= 4]  # every stored hash, compared
        found = index.find(query)
        assert (found is None) == (not brute) and (found is None or found in brute)


def _copy_toyworld(tmp_path, toy_dir) -> tuple[str, list[str]]:
    """Toyworld plus, at the end of the plan (so in a later shard), altered copies of its first three
    images: re-encoded at JPEG quality 40, 10% darker, 8% smaller."""
    root = tmp_path / "toy"
    shutil.copytree(toy_dir, root)
    coco_path = root / "images" / "annotations.json"
    coco = json.loads(coco_path.read_text())
    copies = []
    for k, im in enumerate(sorted(coco["images"], key=lambda im: im["file_name"])[:3]):
        src = Image.open(root / "images" / im["file_name"]).convert("RGB")
        small = ImageEnhance.Brightness(src).enhance(0.9).resize((int(src.width * 0.92), int(src.height * 0.92)))
        name = f"zz_copy{k}.jpg"
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=40)
        (root / "images" / name).write_bytes(buf.getvalue())
        copies.append(name)
        coco["images"].append({**im, "id": 10_000 + k, "file_name": name, "width": small.width,
                               "height": small.height})
        coco["annotations"].append({"id": 10_000 + k, "image_id": 10_000 + k, "label": "thing", "iscrowd": 0,
                                    "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]})
    coco_path.write_text(json.dumps(coco))
    return str(root), copies


def _build(tmp_path, toy, out, **overrides):
    params = toy_params(toy, tmp_path / out, **overrides)
    return run_build(parse_data_config(params["data"]), "unpaired", str(tmp_path / out), runner="local")


def test_near_duplicates_in_later_shards_are_rejected_and_originals_kept(tmp_path, toy_dir):
    toy, copies = _copy_toyworld(tmp_path, toy_dir)
    _build(tmp_path, toy, "off")
    written_off = {json.loads(s["json"])["source_id"] for s in read_samples(tmp_path / "off" / "unpaired")}
    assert set(copies) <= written_off  # without the check, the copies are samples too

    on = _build(tmp_path, toy, "on", filter__near_dupe_max_distance=4)
    samples = read_samples(tmp_path / "on" / "unpaired")
    written = {json.loads(s["json"])["source_id"] for s in samples}
    assert written == written_off - set(copies)  # exactly the copies go, every original stays
    rejected = sum(st["rejected"].get("near_duplicate", 0) for st in read_stats(tmp_path / "on" / "unpaired").values())
    assert rejected == len(copies) and on.totals()["rejected"]["near_duplicate"] == len(copies)
    # The copies sit in the last shard, their originals in the first: the check spans shards.
    last = max(read_stats(tmp_path / "on" / "unpaired"))
    assert read_stats(tmp_path / "on" / "unpaired")[last]["rejected"]["near_duplicate"] == len(copies)

    again = _build(tmp_path, toy, "on", filter__near_dupe_max_distance=4)  # same plan: nothing to redo
    assert again.skipped == again.planned


def test_score_filters_reject_by_name_and_record_scores(tmp_path, toy_dir):
    root = tmp_path / "toy"
    shutil.copytree(toy_dir, root)
    coco_path = root / "images" / "annotations.json"
    coco = json.loads(coco_path.read_text())
    flat = []
    for k in range(2):  # flat grey images with a given subject: nothing sharp in them
        name = f"zz_flat{k}.png"
        Image.fromarray(np.full((96, 96, 3), 100 + 40 * k, np.uint8)).save(root / "images" / name)
        coco["images"].append({"id": 20_000 + k, "file_name": name, "width": 96, "height": 96, "caption": "x"})
        coco["annotations"].append({"id": 20_000 + k, "image_id": 20_000 + k, "label": "thing", "iscrowd": 0,
                                    "segmentation": [[20, 20, 60, 20, 60, 60, 20, 60]]})
        flat.append(name)
    coco_path.write_text(json.dumps(coco))
    hook = {"name": "sharp", "scorer": "pipelines.stages.scores:Sharpness", "min_score": 1.0}
    result = _build(tmp_path, str(root), "out", filter__score_filters=[hook])
    assert result.totals()["rejected"]["low_sharp"] == len(flat)
    samples = read_samples(tmp_path / "out" / "unpaired")
    metas = [json.loads(s["json"]) for s in samples]
    assert samples and not {m["source_id"] for m in metas} & set(flat)
    assert all(m["quality"]["scores"]["sharp"] >= 1.0 for m in metas)


class FixedScores:
    """A scorer whose scores are given: what a model would answer, to test the hook's decisions."""

    def __init__(self, values: list[float]):
        self.values = values

    def __call__(self, images, captions):
        return self.values[: len(images)]


def test_score_filter_stage_rejects_below_min_and_nan():
    cfg = parse_data_config({"filter": {"score_filters": [
        {"name": "aesthetic", "scorer": "tests.pipelines.test_near_dupes:FixedScores", "min_score": 0.5,
         "args": {"values": [0.9, 0.1, float("nan")]}}]}})
    batch = {"image": [np.zeros((4, 4, 3), np.uint8)] * 4, "caption": ["a"] * 4, "reject": [None] * 3 + ["x"]}
    out = ScoreImages(cfg.filter.score_filters)(batch)
    assert out["reject"] == [None, "low_aesthetic", "low_aesthetic", "x"]
    assert out["scores"][0] == {"aesthetic": 0.9} and out["scores"][3] is None


@pytest.mark.parametrize("hook,message", [
    ({"name": "clip", "scorer": "no_such_module:Clip", "min_score": 0.2}, r"score_filters\[0\]\.scorer: cannot load"),
    ({"name": "clip", "scorer": "no_colon", "min_score": 0.2}, r"score_filters\[0\]\.scorer: .* not of the form"),
    ({"name": "Clip Score", "scorer": "pipelines.stages.scores:Sharpness", "min_score": 0.2},
     r"score_filters\[0\]\.name"),
])
def test_score_filter_config_errors_name_the_key(hook, message):
    with pytest.raises(ConfigError, match=r"data\.filter\." + message):
        parse_data_config({"filter": {"score_filters": [hook]}})


def test_near_dupe_distance_is_validated():
    with pytest.raises(ConfigError, match=r"data\.filter\.near_dupe_max_distance"):
        parse_data_config({"filter": {"near_dupe_max_distance": 64}})


def test_score_filters_run_on_video_frames(tmp_path, toy_dir):
    hook = {"name": "sharp", "scorer": "pipelines.stages.scores:Sharpness", "min_score": 0.0}
    params = toy_params(toy_dir, tmp_path / "out", filter__score_filters=[hook])
    run_build(parse_data_config(params["data"]), "paired", str(tmp_path / "out"), runner="local")
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "out" / "paired")]
    assert metas and all(m["quality"]["scores"]["sharp"] > 0 for m in metas)
