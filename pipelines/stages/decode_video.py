"""Stage 1 (videos): bytes -> frames sampled at a fixed rate, plus a thumbnail of every frame.

Adds `frames` (list of HxWx3 uint8), `frame_indices` (decoded frame number of each sampled frame),
`frame_times` (seconds), `thumbs` (tiny colour histograms of *all* frames, for cut detection),
`fps`, `width`, `height` (of the sampled frames after the output size policy, stages/resize.py) and
`geometry`. Decoding goes through every frame (codecs are sequential); only the sampled
ones are kept in full.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import DecodeConfig, VideoConfig
from pipelines.stages.decode import Rejected, check_size
from pipelines.stages.resize import output_geometry

HIST_BINS = 4  # per channel: a 64-bin colour histogram per frame


def colour_hist(frame: np.ndarray) -> np.ndarray:
    q = (frame[::2, ::2].reshape(-1, 3) // (256 // HIST_BINS)).astype(np.int64)
    idx = (q[:, 0] * HIST_BINS + q[:, 1]) * HIST_BINS + q[:, 2]
    h = np.bincount(idx, minlength=HIST_BINS**3).astype(np.float32)
    return h / max(h.sum(), 1.0)


def decode_video(data: bytes | None, dcfg: DecodeConfig, sample_fps: float) -> dict:
    if data is None:
        raise Rejected("read_error")
    if len(data) == 0:
        raise Rejected("empty_file")
    frames, indices, times, thumbs = [], [], [], []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise Rejected("no_video_stream")
            stream = container.streams.video[0]
            check_size(stream.codec_context.width, stream.codec_context.height, dcfg)
            geometry = output_geometry(stream.codec_context.width, stream.codec_context.height, dcfg)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            next_t = 0.0
            for n, frame in enumerate(container.decode(stream)):
                if n >= dcfg.max_video_frames:
                    raise Rejected("too_long")
                arr = frame.to_ndarray(format="rgb24")
                thumbs.append(colour_hist(arr))
                # Timestamps from the frame count: containers disagree on start offsets, counts do not.
                t = n / fps
                if t + 1e-6 >= next_t:
                    frames.append(geometry.image(arr))
                    indices.append(n)
                    times.append(t)
                    next_t += 1.0 / sample_fps
    except Rejected:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise Rejected("undecodable_video") from err
    if not frames:
        raise Rejected("empty_video")
    return {"frames": frames, "frame_indices": indices, "frame_times": times, "thumbs": np.stack(thumbs),
            "fps": fps, "width": frames[0].shape[1], "height": frames[0].shape[0], "geometry": geometry}


@dataclass
class DecodeVideos:
    decode: DecodeConfig
    video: VideoConfig

    def __call__(self, batch: Batch) -> Batch:
        cols = ("frames", "frame_indices", "frame_times", "thumbs", "fps", "width", "height", "geometry")
        for col in cols:
            ensure_column(batch, col)
        ensure_column(batch, "reject")
        for i in list(live_rows(batch)):
            try:
                out = decode_video(batch["data"][i], self.decode, self.video.sample_fps)
            except Rejected as r:
                reject(batch, i, r.reason)
                continue
            for col in cols:
                batch[col][i] = out[col]
            batch["data"][i] = None
        return batch
