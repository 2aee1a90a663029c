"""Toyworld videos: subjects moving, turning, scaling and occluded, some with a scene cut.

Each `clip_NNNN.mp4` (H.264 via av) has a sidecar `clip_NNNN.json` with the caption and, per decoded
frame, the visible instance masks (RLE) with the generator's ground-truth identity. Annotations are
stored in shuffled order so that nothing but masks and appearance can link them across frames.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np

from pipelines.masks import mask_bbox, rle_encode
from pipelines.toyworld.catalogue import Identity
from pipelines.toyworld.images import place
from pipelines.toyworld.render import Placement, background, caption, compose


def _scene_motion(rng: np.random.Generator, start: list[Placement], size: int) -> list[dict]:
    return [{"p0": p, "v": rng.uniform(1.5, 4.0, 2) * rng.choice([-1, 1], 2), "w": rng.uniform(-0.25, 0.25),
             "amp": rng.uniform(0.1, 0.3), "period": rng.uniform(8, 20), "phase": rng.uniform(0, 2 * np.pi)}
            for p in start]


def _at(m: dict, t: int, size: int) -> Placement:
    p0: Placement = m["p0"]
    r = p0.radius * (1 + m["amp"] * np.sin(2 * np.pi * t / m["period"] + m["phase"]))
    pos = []
    for c0, v in zip((p0.cx, p0.cy), m["v"], strict=True):
        lo, hi = r, size - r  # bounce off the borders
        span = max(hi - lo, 1e-6)
        x = (c0 - lo + v * t) % (2 * span)
        pos.append(lo + (x if x <= span else 2 * span - x))
    return Placement(p0.identity, pos[0], pos[1], r, p0.angle + m["w"] * t)


def write_video(path: str, frames: list[np.ndarray], fps: int) -> None:
    # bitexact container and a single-threaded x264 without lookahead / mb-tree: with those, x264
    # output was seen to depend on earlier encodes in the same process; this way the bytes are a
    # function of the frames alone.
    with av.open(path, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast",
                          "x264-params": "threads=1:lookahead-threads=1:sync-lookahead=0:rc-lookahead=0:mbtree=0"}
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_videos(out_dir: str, cat: list[Identity], num: int, size: int, fps: int, seconds: float,
                 max_subjects: int, cut_fraction: float, seed: int, caption_style: str,
                 scale: tuple[float, float], multi_scale: tuple[float, float]) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    num_frames = max(2, int(round(fps * seconds)))
    cuts = 0
    for vid in range(num):
        n = int(rng.integers(1, max_subjects + 1))
        idents = [cat[i] for i in rng.choice(len(cat), size=n, replace=False)]
        cut = int(rng.integers(num_frames // 3, 2 * num_frames // 3 + 1)) if rng.random() < cut_fraction else None
        cuts += cut is not None
        scenes = [(0, cut or num_frames)] + ([(cut, num_frames)] if cut else [])
        frames, annotations = [], []
        for start, stop in scenes:
            bg = background(rng, size)
            motion = _scene_motion(rng, place(rng, idents, size, scale, multi_scale), size)
            occ = (rng.uniform(-0.3, 0.3) * size, rng.uniform(0.08, 0.15) * size, rng.uniform(90, 160),
                   rng.uniform(3, 6) * rng.choice([-1, 1])) if rng.random() < 0.6 else None
            for t in range(stop - start):
                ps = [_at(m, t, size) for m in motion]
                bar = None if occ is None else ((occ[0] + occ[3] * t) % (1.3 * size) - 0.15 * size, occ[1], occ[2])
                img, visible, _ = compose(bg, ps, bar)
                anns = []
                for p, v in zip(ps, visible, strict=True):
                    box = mask_bbox(v)
                    if box is None:
                        continue
                    anns.append({"label": p.identity.label, "identity": p.identity.id,
                                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                 "area": int(v.sum()), "segmentation": rle_encode(v)})
                order = rng.permutation(len(anns))
                annotations.append({"index": start + t, "annotations": [anns[i] for i in order]})
                frames.append(img)
        name = f"clip_{vid:04d}"
        write_video(os.path.join(out_dir, name + ".mp4"), frames, fps)
        with open(os.path.join(out_dir, name + ".json"), "w") as f:
            json.dump({"caption": caption(idents, caption_style), "fps": fps, "width": size, "height": size,
                       "num_frames": num_frames, "scene_cuts": [cut] if cut else [],
                       "identities": [i.id for i in idents], "frames": annotations}, f)
    return {"videos": num, "with_cut": cuts, "frames_per_video": num_frames}
