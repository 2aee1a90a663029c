"""Stage 1 (videos): bytes -> per scene, a bounded set of frames sampled evenly over the scene.

Streams the video once: every decoded frame feeds the cut detector (stages/scenes.py); frames are
offered for sampling at `data.video.sample_fps` by their container timestamps (variable frame rate
clips included), and each scene keeps at most `data.video.max_frames_per_scene` of them, evenly
spread (stride doubling). Memory is bounded per scene and the later per-frame stages (annotate,
filter, track, pairs) do bounded work per scene, so a long video costs time linear in its length.

Adds `frames` (list of HxWx3 uint8, after the output size policy, stages/resize.py),
`frame_indices` (decoded frame number of each kept frame), `frame_times` (seconds from the first
frame), `cuts` (frame numbers that start a scene), `fps` (the stream's average rate), `width`,
`height`, `geometry`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import DecodeConfig, VideoConfig
from pipelines.stages.decode import Rejected, check_size
from pipelines.stages.resize import output_geometry
from pipelines.stages.scenes import CutDetector

HIST_BINS = 4  # per channel: a 64-bin colour histogram per frame


def colour_hist(frame: np.ndarray) -> np.ndarray:
    q = (frame[::2, ::2].reshape(-1, 3) // (256 // HIST_BINS)).astype(np.int64)
    idx = (q[:, 0] * HIST_BINS + q[:, 1]) * HIST_BINS + q[:, 2]
    h = np.bincount(idx, minlength=HIST_BINS**3).astype(np.float32)
    return h / max(h.sum(), 1.0)


@dataclass
class SceneFrames:
    """The kept frames of one scene, at most `limit`. Sampling instants are numbered within the
    scene; one is kept when its number is a multiple of `stride`. When more than `limit` are kept,
    the stride doubles and the kept frames off the new stride go, so the kept ones stay evenly
    spread over the whole scene, however long it turns out to be."""

    limit: int
    stride: int = 1
    offered: int = 0
    kept: list[tuple[int, int, float, np.ndarray]] = field(default_factory=list)  # (instant, index, t, frame)

    def offer(self, index: int, t: float, frame: Callable[[], np.ndarray]) -> None:
        instant, self.offered = self.offered, self.offered + 1
        if instant % self.stride:
            return
        self.kept.append((instant, index, t, frame()))
        if len(self.kept) > self.limit:
            self.stride *= 2
            self.kept = [k for k in self.kept if k[0] % self.stride == 0]


def _frame_time(frame: av.VideoFrame, n: int, fps: float) -> float:
    # Container timestamps: right for variable frame rates, where n / fps drifts.
    return float(frame.time) if frame.time is not None else n / fps


def decode_video(data: bytes | None, dcfg: DecodeConfig, vcfg: VideoConfig) -> dict:
    if data is None:
        raise Rejected("read_error")
    if len(data) == 0:
        raise Rejected("empty_file")
    cuts: list[int] = []
    scenes = [SceneFrames(vcfg.max_frames_per_scene)]
    detector = CutDetector(vcfg.cut_threshold)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise Rejected("no_video_stream")
            stream = container.streams.video[0]
            check_size(stream.codec_context.width, stream.codec_context.height, dcfg)
            geometry = output_geometry(stream.codec_context.width, stream.codec_context.height, dcfg)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            start, next_t = None, 0.0
            for n, frame in enumerate(container.decode(stream)):
                if n >= dcfg.max_video_frames:
                    raise Rejected("too_long")
                arr = frame.to_ndarray(format="rgb24")
                if detector.is_cut(colour_hist(arr)):
                    cuts.append(n)
                    scenes.append(SceneFrames(vcfg.max_frames_per_scene))
                # Times from the first frame: containers disagree on start offsets.
                t = _frame_time(frame, n, fps)
                start = t if start is None else start
                t -= start
                if t + 1e-6 >= next_t:
                    scenes[-1].offer(n, round(t, 6), lambda arr=arr: geometry.image(arr))
                    while next_t <= t + 1e-6:
                        next_t += 1.0 / vcfg.sample_fps
    except Rejected:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise Rejected("undecodable_video") from err
    kept = [k for scene in scenes for k in scene.kept]
    if not kept:
        raise Rejected("empty_video")
    frames = [k[3] for k in kept]
    return {"frames": frames, "frame_indices": [k[1] for k in kept], "frame_times": [k[2] for k in kept],
            "cuts": cuts, "fps": fps, "width": frames[0].shape[1], "height": frames[0].shape[0],
            "geometry": geometry}


@dataclass
class DecodeVideos:
    decode: DecodeConfig
    video: VideoConfig

    def __call__(self, batch: Batch) -> Batch:
        cols = ("frames", "frame_indices", "frame_times", "cuts", "fps", "width", "height", "geometry")
        for col in cols:
            ensure_column(batch, col)
        ensure_column(batch, "reject")
        for i in list(live_rows(batch)):
            try:
                out = decode_video(batch["data"][i], self.decode, self.video)
            except Rejected as r:
                reject(batch, i, r.reason)
                continue
            for col in cols:
                batch[col][i] = out[col]
            batch["data"][i] = None
            given = batch.get("frame_annotations")
            if given and given[i]:  # only the kept frames' annotations are needed from here on
                keep = set(out["frame_indices"])
                given[i] = {n: anns for n, anns in given[i].items() if n in keep}
        return batch
