"""The `auto` path end to end: tiny random-weight GroundingDINO + SAM (real groundingdino-py and
segment-anything code, local files, no download) as a Ray actor pool inside the build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipelines.shards.contract import decode_subjects
from tests.pipelines.helpers import read_samples, read_stats, toy_params, write_params
from tests.pipelines.processes import REPO, child_env


def auto_params(tmp_path, toy_dir, model: dict) -> dict:
    images = tmp_path / "images"
    images.mkdir()
    coco = json.loads(open(f"{toy_dir}/images/annotations.json").read())
    lines = []
    for img in coco["images"][:4]:
        shutil.copy(f"{toy_dir}/images/{img['file_name']}", images / img["file_name"])
        lines.append(json.dumps({"file": img["file_name"], "caption": img["caption"]}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(f"{toy_dir}/videos/clip_0001.mp4", videos / "clip_0001.mp4")
    # A sidecar with the caption only: the prompt for the detector, no given masks.
    caption = json.loads(open(f"{toy_dir}/videos/clip_0001.json").read())["caption"]
    (videos / "clip_0001.json").write_text(json.dumps({"caption": caption}))
    params = toy_params(toy_dir, tmp_path / "out")
    data = params["data"]
    data["sources"] = {"unpaired": [{"type": "image_folder", "name": "folder", "path": str(images)}],
                       "paired": [{"type": "video_folder", "name": "clips", "path": str(videos)}]}
    data["annotate"] = {"mode": "auto", "auto": {"model": model, "num_gpus": 0.0, "batch_size": 2, "concurrency": 1}}
    # Random weights find random things: open the filters so that some of them reach the shards.
    data["filter"].update(min_score=0.0, min_area_frac=0.0, min_box_fill=0.0, max_box_aspect=100.0,
                          max_containment=1.0, max_instance_iou=1.0, max_subjects=20)
    data["shards"]["images_per_shard"] = 2
    data["video"].update(sample_fps=1.0, min_gap_s=0.5, min_pair_quality=0.0, min_appearance=0.0, min_link_score=0.0)
    return params


def build(pfile: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/build_shards.py", "--params", pfile], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=600)


def test_auto_without_weights_fails_before_any_work(tmp_path, toy_dir):
    params = auto_params(tmp_path, toy_dir, {"sam_model_type": "vit_b"})
    proc = build(write_params(tmp_path / "p.yaml", params))
    assert proc.returncode != 0
    assert "data.annotate.auto.model" in proc.stderr and "gdino_config" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


@pytest.mark.slow
def test_auto_annotation_build_end_to_end(tmp_path, toy_dir):
    from pipelines.tiny_detectors import write_tiny_detectors

    model = write_tiny_detectors(tmp_path / "tiny", seed=0).to_dict()
    params = auto_params(tmp_path, toy_dir, model)
    proc = build(write_params(tmp_path / "p.yaml", params))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "annotate_auto" in proc.stderr + proc.stdout  # the actor-pool operator ran in Ray Data
    for kind, inputs in (("unpaired", 4), ("paired", 1)):
        folder = tmp_path / "out" / kind
        stats = read_stats(folder)
        assert sum(s["inputs"] for s in stats.values()) == inputs
        for s in stats.values():
            assert s["inputs"] == s["written"] + sum(s["rejected"].values())
            assert "annotate_auto" in s["timings_s"]
        samples = read_samples(folder)
        assert len(samples) == sum(s["samples"] for s in stats.values())
    samples = read_samples(tmp_path / "out" / "unpaired")
    assert samples, "the tiny models found nothing in any image"
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["subjects"] and all(sub["score"] > model["box_threshold"] for sub in meta["subjects"])
        decoded = decode_subjects(s, meta)
        assert len(decoded.refs) == len(meta["subjects"]) and decoded.masks.any(axis=(1, 2)).all()
        for sub in meta["subjects"]:
            assert sub["label"] in meta["caption"]  # a noun phrase of the caption
