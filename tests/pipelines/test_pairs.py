from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.batch import from_rows
from pipelines.config import DecodeConfig, FilterConfig, RefsConfig, VideoConfig
from pipelines.masks import mask_iou, segmentation_to_mask
from pipelines.runner import OnFrames
from pipelines.sources.video_folder import VideoFolderConfig, VideoFolderSource
from pipelines.stages.annotate_given import AnnotateGiven
from pipelines.stages.decode_video import DecodeVideos
from pipelines.stages.filter import FilterSubjects
from pipelines.stages.pairs import MakePairs
from pipelines.stages.scenes import DetectScenes
from pipelines.stages.track import track_scene


def paired(toy_dir: str, video: VideoConfig) -> dict:
    src = VideoFolderSource(VideoFolderConfig(name="toy", path=f"{toy_dir}/videos"))
    batch = from_rows(list(src.read([u for units in src.plan(100) for u in units])))
    for stage in (DecodeVideos(DecodeConfig(), video), DetectScenes(video), OnFrames(AnnotateGiven()),
                  OnFrames(FilterSubjects(FilterConfig())), MakePairs(video, RefsConfig())):
        batch = stage(batch)
    return batch


def truth_mask(toy_dir: str, video: str, frame: int, identity: int) -> np.ndarray:
    side = json.loads(Path(toy_dir, "videos", video.replace(".mp4", ".json")).read_text())
    ann = next(a for a in side["frames"][frame]["annotations"] if a["identity"] == identity)
    return segmentation_to_mask(ann["segmentation"], side["height"], side["width"])


def test_pairs_keep_identity_and_respect_thresholds(toy_dir):
    video = VideoConfig(min_gap_s=0.5, max_pair_iou=0.9)
    batch = paired(toy_dir, video)
    samples = [s for ss in batch["samples"] if ss for s in ss]
    subjects = [sub for s in samples for sub in s["subjects"]]
    assert len(samples) >= 8 and len(subjects) >= 10
    same = sum(sub["identity"] == sub["ref_identity"] for sub in subjects)
    assert same / len(subjects) >= 0.95
    for s in samples:
        name = s["source_id"].split("#")[0]
        side = json.loads(Path(toy_dir, "videos", name.replace(".mp4", ".json")).read_text())
        assert s["time_gap_s"] >= video.min_gap_s
        cut = side["scene_cuts"][0] if side["scene_cuts"] else None
        if cut is not None:  # never across a scene cut
            assert (s["frame_a"] >= cut) == (s["frame_b"] >= cut)
        # every annotated subject of the target is in the sample, each with a reference from frame A
        assert len(s["subjects"]) >= 1
        for sub in s["subjects"]:
            assert sub["ref_from"] == f"frame:{s['frame_a']}"
            # IoU recomputed from the generator's own masks of this identity in frames A and B
            a = truth_mask(toy_dir, name, s["frame_a"], sub["ref_identity"])
            b = truth_mask(toy_dir, name, s["frame_b"], sub["identity"])
            assert mask_iou(a, b) <= video.max_pair_iou + 1e-6
            assert sub["refmask"].any() and sub["ref"].shape[:2] == sub["refmask"].shape
        assert s["pair_quality"] == min(sub["match_score"] for sub in s["subjects"]) >= video.min_pair_quality
    # each video row is either paired or rejected
    assert all((r is None) == bool(ss) for r, ss in zip(batch["reject"], batch["samples"], strict=True))


def test_stricter_thresholds_give_fewer_pairs_within_them(toy_dir):
    loose = paired(toy_dir, VideoConfig(min_gap_s=0.25, max_pair_iou=0.95))
    strict = paired(toy_dir, VideoConfig(min_gap_s=1.0, max_pair_iou=0.3))
    n = lambda b: sum(len(ss or []) for ss in b["samples"])  # noqa: E731
    assert n(strict) < n(loose)
    for ss in strict["samples"]:
        for s in ss or []:
            assert s["time_gap_s"] >= 1.0
            assert all(sub["mask_iou"] <= 0.3 for sub in s["subjects"])


def square(img, mask_list, y, x, colour, size=12):
    m = np.zeros(img.shape[:2], bool)
    m[y : y + size, x : x + size] = True
    img[m] = colour
    mask_list.append({"label": "sq", "bbox": [x, y, x + size, y + size], "score": 1.0, "mask": m})


def test_tracking_links_by_overlap_and_appearance():
    # A red and a blue square move 3 px per frame towards each other; detections come in a shuffled order.
    frames, subjects = [], []
    rng = np.random.default_rng(0)
    for t in range(6):
        img = np.full((64, 64, 3), 128, np.uint8)
        subs = []
        square(img, subs, 10, 5 + 3 * t, (220, 30, 30))
        square(img, subs, 40, 45 - 3 * t, (30, 30, 220))
        order = rng.permutation(2)
        frames.append(img)
        subjects.append([subs[i] for i in order])
    tracks = track_scene(list(range(6)), subjects, frames, VideoConfig())
    assert len(tracks) == 2
    for tr in tracks:
        colours = {tuple(frames[k][subjects[k][j]["mask"]][0]) for k, j in tr.members.items()}
        assert len(colours) == 1 and len(tr.members) == 6
    # A subject whose appearance changes completely starts a new track, even where it overlaps.
    frames[3] = frames[3].copy()
    red = next(s for s in subjects[3] if frames[3][s["mask"]][0][0] == 220)
    frames[3][red["mask"]] = (30, 220, 30)
    assert len(track_scene(list(range(6)), subjects, frames, VideoConfig())) >= 3
