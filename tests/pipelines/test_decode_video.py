from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.config import DecodeConfig, VideoConfig
from pipelines.stages.decode_video import DecodeVideos
from pipelines.stages.scenes import DetectScenes, find_cuts


def videos(toy_dir: str) -> list[Path]:
    return sorted(Path(toy_dir, "videos").glob("*.mp4"))


def decode(datas, video: VideoConfig | None = None) -> dict:
    video = video or VideoConfig()
    batch = {"data": list(datas), "reject": [None] * len(datas)}
    return DetectScenes(video)(DecodeVideos(DecodeConfig(), video)(batch))


def test_frames_sampled_at_the_set_rate(toy_dir):
    out = decode([videos(toy_dir)[0].read_bytes()], VideoConfig(sample_fps=2.0))
    assert out["reject"] == [None]
    assert out["fps"][0] == 8.0
    assert out["frame_indices"][0] == [0, 4, 8, 12]  # 8 fps source, 2 fps samples, over 16 frames
    assert np.allclose(out["frame_times"][0], [0, 0.5, 1.0, 1.5])
    assert all(f.shape == (96, 96, 3) for f in out["frames"][0])


def test_scene_cuts_match_the_generator(toy_dir):
    paths = videos(toy_dir)
    out = decode([p.read_bytes() for p in paths])
    for i, p in enumerate(paths):
        truth = json.loads(p.with_suffix(".json").read_text())["scene_cuts"]
        assert out["cuts"][i] == truth, p.name
        # sampled frames are labelled with the scene they belong to
        expected = [int(bool(truth) and f >= truth[0]) for f in out["frame_indices"][i]]
        assert out["scene_ids"][i] == expected


def test_corrupt_videos_are_rejected(toy_dir):
    good = videos(toy_dir)[0].read_bytes()
    out = decode([good[: len(good) // 3], b"", b"not a video at all" * 10, good])
    assert out["reject"][:3] == ["undecodable_video", "empty_file", "undecodable_video"]
    assert out["reject"][3] is None


def test_find_cuts_threshold():
    a, b = np.zeros(64), np.zeros(64)
    a[0], b[63] = 1, 1
    assert find_cuts(np.stack([a, a, b, b]), 0.4) == [2]
    assert find_cuts(np.stack([a, a]), 0.4) == []
