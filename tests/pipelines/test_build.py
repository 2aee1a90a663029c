"""The build without Ray (`runner=local`, the same stage groups): accounting, corrupt inputs, reruns."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from pipelines.build import run_build
from pipelines.config import parse_data_config
from tests.pipelines.helpers import read_samples, read_stats, toy_params

CORRUPT = {"zz_truncated.jpg": "truncated", "zz_empty.jpg": "empty_file", "zz_text.jpg": "not_an_image",
           "zz_nothing.png": "no_subjects"}


def corrupt_toyworld(tmp_path, toy_dir) -> str:
    """A copy of toyworld plus one input of each kind of breakage, listed in its annotations."""
    root = tmp_path / "toy"
    shutil.copytree(toy_dir, root)
    good = (root / "images" / "000001.jpg").read_bytes()
    (root / "images" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "images" / "zz_empty.jpg").write_bytes(b"")
    (root / "images" / "zz_text.jpg").write_text("this is not a JPEG\n")
    Image.fromarray(np.full((96, 96, 3), 90, np.uint8)).save(root / "images" / "zz_nothing.png")
    coco_path = root / "images" / "annotations.json"
    coco = json.loads(coco_path.read_text())
    for k, name in enumerate(CORRUPT):
        coco["images"].append({"id": 1000 + k, "file_name": name, "width": 96, "height": 96, "caption": "x"})
    coco_path.write_text(json.dumps(coco))
    clip = (root / "videos" / "clip_0000.mp4").read_bytes()
    (root / "videos" / "clip_zz_corrupt.mp4").write_bytes(clip[:200] + b"\x00" * 500 + clip[700:1500])
    return str(root)


def build(params, kind, runner="local"):
    return run_build(parse_data_config(params["data"]), kind, params["data"]["out_dir"], runner)


def check_accounting(folder, stats_by_shard):
    samples = read_samples(folder)
    for n, st in stats_by_shard.items():
        assert st["inputs"] == st["written"] + sum(st["rejected"].values()), n
        keys = [s["__key__"] for s in samples if s["__key__"].split("-")[1] == f"{n:06d}"]
        assert len(keys) == st["samples"]
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys))
    return samples


def test_every_input_is_accounted_for_and_corrupt_ones_are_rejected(tmp_path, toy_dir):
    toy = corrupt_toyworld(tmp_path, toy_dir)
    params = toy_params(toy, tmp_path / "out")
    un = build(params, "unpaired")
    pa = build(params, "paired")
    t_un, t_pa = un.totals(), pa.totals()
    n_images = len(json.loads(open(f"{toy}/images/annotations.json").read())["images"])
    assert t_un["inputs"] == n_images == t_un["written"] + sum(t_un["rejected"].values())
    for reason in ("truncated", "empty_file", "not_an_image"):
        assert t_un["rejected"][reason] == 1
    assert t_un["rejected"]["no_subjects"] >= 1  # the blank image (and any toyworld empty scene)
    assert t_pa["inputs"] == 7 and t_pa["rejected"].get("undecodable_video") == 1
    assert t_pa["written"] + sum(t_pa["rejected"].values()) == 7
    # what the stats say is what the shards hold
    un_samples = check_accounting(tmp_path / "out" / "unpaired", read_stats(tmp_path / "out" / "unpaired"))
    pa_samples = check_accounting(tmp_path / "out" / "paired", read_stats(tmp_path / "out" / "paired"))
    assert len(un_samples) == t_un["samples"] == t_un["written"] and len(pa_samples) == t_pa["samples"] > 0
    assert {json.loads(s["json"])["kind"] for s in pa_samples} == {"paired"}
    assert not {json.loads(s["json"])["source_id"] for s in un_samples} & set(CORRUPT)


def snapshot(folder):
    return {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns) for n in sorted(os.listdir(folder))}


def test_rerun_skips_done_shards_and_redoes_the_rest(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "out")
    first = build(params, "unpaired")
    folder = tmp_path / "out" / "unpaired"
    before = snapshot(folder)
    again = build(params, "unpaired")
    assert again.stats == [] and again.skipped == first.planned and snapshot(folder) == before  # wrote nothing
    # a run killed after publishing shard 2's tar but before its stats, with a temp file of shard 3
    tar2 = (folder / "000002.tar").read_bytes()
    os.remove(folder / "000002.stats.json")
    os.remove(folder / "000003.stats.json")
    (folder / ".000003.tar.0123abcd.tmp").write_bytes(b"partial")
    resumed = build(params, "unpaired")
    assert [s["shard"] for s in resumed.stats] == [2, 3]
    assert (folder / "000002.tar").read_bytes() == tar2
    assert resumed.cleaned == [".000003.tar.0123abcd.tmp"] and resumed.removed == []
    assert {n: v for n, v in snapshot(folder).items() if not n.startswith(("000002", "000003"))} == {
        n: v for n, v in before.items() if not n.startswith(("000002", "000003"))}


def test_changed_params_redo_shards_and_drop_ones_no_longer_planned(tmp_path, toy_dir):
    params = toy_params(toy_dir, tmp_path / "out")
    first = build(params, "unpaired")
    folder = tmp_path / "out" / "unpaired"
    before = read_stats(folder)
    # Stricter filters in larger shards: fewer samples is what the new params ask for, so no --prune
    # is needed; the result lists every shard replaced and removed.
    stricter = toy_params(toy_dir, tmp_path / "out", filter__min_area_frac=0.05, shards__images_per_shard=12)
    second = build(stricter, "unpaired")
    assert second.skipped == 0 and second.planned == 2 < first.planned
    assert sorted(os.listdir(folder)) == ["000000.stats.json", "000000.status.parquet", "000000.tar",
                                          "000001.stats.json", "000001.status.parquet", "000001.tar"]
    assert [name for name, _ in second.removed] == [f"{n:06d}.{ext}" for n in range(2, first.planned)
                                                    for ext in ("stats.json", "status.parquet", "tar")]
    assert {why for _, why in second.removed} == {"not in the plan any more: source 'toyworld' now has 2 shard(s)"}
    after = read_stats(folder)
    assert second.replaced == [(n, before[n]["samples"], after[n]["samples"], "params changed") for n in (0, 1)]
    assert sum(s["samples"] for s in after.values()) < sum(s["samples"] for s in before.values())
    hashes = {st["params_hash"] for st in after.values()}
    assert hashes == {json.loads(s["json"])["params_hash"] for s in read_samples(folder)} and len(hashes) == 1
    assert all(sub["area_frac"] >= 0.05 for s in read_samples(folder) for sub in json.loads(s["json"])["subjects"])


def test_output_to_a_file_url(tmp_path, toy_dir):
    params = toy_params(toy_dir, f"file://{tmp_path}/remote")
    result = build(params, "paired")
    assert result.out == f"file://{tmp_path}/remote/paired"
    stats = read_stats(tmp_path / "remote" / "paired")
    assert len(stats) == result.planned and sum(s["samples"] for s in stats.values()) > 0


def test_a_source_that_finds_nothing_is_an_error_and_deletes_nothing(tmp_path):
    import pytest

    from pipelines.build import run_build
    from pipelines.config import ConfigError, parse_data_config

    out = tmp_path / "out" / "unpaired"
    out.mkdir(parents=True)
    (out / "000000.tar").write_bytes(b"published")
    (out / "000000.stats.json").write_text("{}")
    params = {"sources": {"unpaired": [{"type": "webdataset", "name": "gone", "path": str(tmp_path / "missing" / "*.tar")}],
                          "paired": []}}
    cfg = parse_data_config(params)
    with pytest.raises(ConfigError, match="found no inputs"):
        run_build(cfg, "unpaired", str(tmp_path / "out"), runner="local")
    assert (out / "000000.tar").read_bytes() == b"published" and (out / "000000.stats.json").exists()


def test_an_input_rewritten_under_the_same_name_redoes_its_shard(tmp_path):
    import os

    from pipelines.build import units_digest

    image = tmp_path / "a.jpg"
    image.write_bytes(b"one")
    before = units_digest([{"file": str(image), "caption": "x"}])
    image.write_bytes(b"other bytes")
    os.utime(image, ns=(1, 1))
    assert units_digest([{"file": str(image), "caption": "x"}]) != before


def test_source_names_are_unique_across_kinds():
    import pytest

    from pipelines.config import ConfigError, parse_data_config

    with pytest.raises(ConfigError, match="used twice"):
        parse_data_config({"sources": {
            "unpaired": [{"type": "webdataset", "name": "same", "path": "/x/*.tar"}],
            "paired": [{"type": "video_folder", "name": "same", "path": "/x"}]}})
