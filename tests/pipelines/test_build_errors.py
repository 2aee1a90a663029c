"""User mistakes end the real CLI with one line on stderr naming the key or path, exit code 2, no
traceback, and nothing created; `auto` on a video with nothing to prompt with says `no_labels`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.pipelines.helpers import toy_params, write_params
from tests.pipelines.processes import REPO, child_env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/build_shards.py", "--runner", "local", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)


def _missing_videos(data, tmp):
    data["sources"]["paired"][0]["path"] = f"{tmp}/no_videos"
    return f"data.sources.paired[0].path: {tmp}/no_videos does not exist"


def _missing_annotations(data, tmp):
    data["sources"]["unpaired"][0]["annotations"] = f"{tmp}/none.json"
    return f"data.sources.unpaired[0].annotations: {tmp}/none.json does not exist"


def _typo(data, tmp):
    data["filter"]["min_scor"] = 0.2
    return "data.filter.min_scor: unknown key (allowed: dedupe, max_area_frac, max_box_aspect, max_containment, " \
           "max_image_aspect, max_instance_iou, max_subjects, min_area_frac, min_box_fill, min_image_side, " \
           "min_score, min_subjects, near_dupe_max_distance, score_filters)"


def _bad_captions(data, tmp):
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "captions.jsonl").write_text('{"file": "a.jpg"}\n{"caption": "no file"}\n')
    data["sources"]["unpaired"] = [{"type": "image_folder", "name": "folder", "path": f"{tmp}/imgs"}]
    return f"data.sources.unpaired[0].captions: {tmp}/imgs/captions.jsonl:2: missing 'file'"


def _no_weights(data, tmp):
    data["annotate"] = {"mode": "auto", "auto": {"model": {"sam_model_type": "vit_b"}}}
    return "data.annotate.auto.model.gdino_config: required key is missing"


@pytest.mark.parametrize("edit", [_missing_videos, _missing_annotations, _typo, _bad_captions, _no_weights])
def test_a_params_or_input_mistake_is_one_line_naming_it(tmp_path, toy_dir, edit):
    params = toy_params(toy_dir, tmp_path / "out")
    expected = edit(params["data"], tmp_path)
    proc = cli("--params", write_params(tmp_path / "params.yaml", params))
    assert (proc.returncode, proc.stderr) == (2, f"error: {expected}\n")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_cli_mistakes_are_one_line_too(tmp_path, toy_dir):
    missing = cli("--params", f"{tmp_path}/nope.yaml")
    assert (missing.returncode, missing.stderr) == (2, f"error: --params: {tmp_path}/nope.yaml: No such file or directory\n")
    pfile = write_params(tmp_path / "params.yaml", toy_params(toy_dir, tmp_path / "out"))
    bad_set = cli("--params", pfile, "--set", "filter.min_score=0.5")
    assert (bad_set.returncode, bad_set.stderr) == (2, "error: --set 'filter.min_score=0.5': expected data.<key>=<value>\n")
    deep = cli("--params", pfile, "--set", "data.filter.min_score.x=1")
    assert (deep.returncode, deep.stderr) == (2, "error: data.filter.min_score: not a mapping, cannot set "
                                                 "data.filter.min_score.x\n")
    assert not (tmp_path / "out").exists()


def test_auto_on_a_video_without_caption_or_labels_is_no_labels(tmp_path, toy_dir):
    import shutil

    from pipelines.build import plan_shards
    from pipelines.config import parse_data_config
    from pipelines.runner import make_groups, run_local
    from pipelines.tiny_detectors import write_tiny_detectors

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(f"{toy_dir}/videos/clip_0001.mp4", videos / "clip_0001.mp4")  # no sidecar: no caption
    params = toy_params(toy_dir, tmp_path / "out")
    data = params["data"]
    data["sources"]["paired"] = [{"type": "video_folder", "name": "clips", "path": str(videos)}]
    model = write_tiny_detectors(tmp_path / "tiny", seed=0).to_dict()
    data["annotate"] = {"mode": "auto", "auto": {"model": model, "batch_size": 2}}
    data["video"]["sample_fps"] = 2.0
    cfg = parse_data_config(data)
    # The shard's stages as the build runs them (run_build would then refuse the build: its one
    # source gave nothing), so that the shard's own accounting can be read.
    [spec] = plan_shards(cfg, "paired")
    out = str(tmp_path / "out" / "paired")
    os.makedirs(out)
    stats = run_local({"spec": spec, "rows": None, "timings": {}}, make_groups(cfg, "paired", out))
    assert (stats["inputs"], stats["rejected"]) == (1, {"no_labels": 1})

    from pipelines.shards.status import read_status

    [row] = read_status(out)
    assert (row["input_id"], row["status"]) == ("clip_0001.mp4", "no_labels")
    assert row["detail"].startswith("no noun phrase in the caption")
