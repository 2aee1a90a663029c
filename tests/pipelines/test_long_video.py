"""Long videos in linear time: bounded, evenly spread frames per scene; times from the container's
timestamps; candidate pairs sampled by time gap and spread over the allowed gaps."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from pipelines.config import DecodeConfig, RefsConfig, VideoConfig
from pipelines.stages.decode_video import DecodeVideos
from pipelines.stages.pairs import MakePairs
from pipelines.stages.scenes import DetectScenes


def write_clip(frames: list[np.ndarray], times_ms: list[int]) -> bytes:
    """An H.264 MP4 whose frames carry the given presentation times (a variable frame rate when uneven)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for arr, t in zip(frames, times_ms, strict=True):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def moving_square(n: int, background: int, size: int = 32) -> list[np.ndarray]:
    frames = []
    for i in range(n):
        img = np.full((size, size, 3), background, np.uint8)
        x = 2 + (i % 20)
        img[10:18, x : x + 8] = (200, 40, 40)
        frames.append(img)
    return frames


def decode(data: bytes, video: VideoConfig) -> dict:
    batch = {"data": [data], "reject": [None]}
    return DetectScenes(video)(DecodeVideos(DecodeConfig(), video)(batch))


def test_frame_times_come_from_the_container_timestamps():
    times_ms = [0, 40, 80, 200, 240, 400, 440, 600, 1000, 1040]  # a variable frame rate
    out = decode(write_clip(moving_square(10, 90), times_ms), VideoConfig(sample_fps=100.0))
    assert out["reject"] == [None] and out["frame_indices"][0] == list(range(10))
    np.testing.assert_allclose(out["frame_times"][0], np.array(times_ms) / 1000, atol=1e-6)


def test_each_scene_keeps_a_bounded_evenly_spread_set_of_frames():
    # Two scenes of 30 s at 10 fps (a cut at frame 300: the background changes), sampled at 4 fps:
    # 120 sampling instants per scene, at most 16 frames kept per scene.
    frames = moving_square(300, 90) + moving_square(300, 200)
    out = decode(write_clip(frames, [100 * i for i in range(600)]),
                 VideoConfig(sample_fps=4.0, max_frames_per_scene=16))
    assert out["reject"] == [None] and out["cuts"][0] == [300]
    times, scenes = np.array(out["frame_times"][0]), np.array(out["scene_ids"][0])
    for scene, (start, end) in enumerate([(0.0, 29.9), (30.0, 59.9)]):
        t = times[scenes == scene]
        assert 8 <= len(t) <= 16  # halved at most once too often, never more than the bound
        gaps = np.diff(t)
        assert np.allclose(gaps, gaps[0], atol=0.01)  # evenly spread
        assert t[0] == start and t[-1] >= end - gaps[0]  # over the whole scene
    assert all(f.shape == (32, 32, 3) for f in out["frames"][0])


def _moving_row(n: int = 12) -> dict:
    """One scene of n frames, 0.5 s apart, one subject moving right: every gap matches equally well, so
    ranking candidates by quality and gap alone would crowd the pairs at one end of the gaps."""
    frames, subjects = [], []
    for k in range(n):
        img = np.full((64, 64, 3), 128, np.uint8)
        mask = np.zeros((64, 64), bool)
        x = 4 + 4 * k
        mask[20:36, x : x + 12] = True
        img[mask] = (220 - k, 40 + k, 40)
        frames.append(img)
        subjects.append([{"label": "sq", "bbox": [x, 20, x + 12, 36], "score": 1.0, "mask": mask}])
    return {"frames": frames, "subjects": subjects, "scene_ids": [0] * n, "frame_times": [0.5 * k for k in range(n)],
            "frame_indices": list(range(n)), "caption": "a square", "source_id": "v.mp4"}


def test_pairs_spread_over_the_allowed_gaps():
    video = VideoConfig(min_gap_s=0.5, max_pairs_per_scene=4, max_pair_iou=0.95, min_pair_quality=0.3,
                        min_appearance=0.0, min_link_score=0.0)
    samples, _ = MakePairs(video, RefsConfig()).pairs_of(_moving_row())
    gaps = sorted(s["time_gap_s"] for s in samples)
    assert len(samples) == 4
    # Allowed gaps 0.5 .. 5.5 s in four bins of 1.25 s: one pair from each.
    assert [int((g - 0.5) // 1.25) for g in gaps] == [0, 1, 2, 3]
    assert len({s["frame_b"] for s in samples}) == 4
