"""Generate the toyworld files: `<out>/images` (COCO JSON + images) and `<out>/videos` (mp4 + json).

`<out>/manifest.json` is written last, with the config it was made from: a complete folder made from
the same config is not regenerated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

from pipelines.config import ToyworldConfig, load_data_config
from pipelines.toyworld.catalogue import catalogue
from pipelines.toyworld.images import write_images
from pipelines.toyworld.render import CAPTION_STYLES
from pipelines.toyworld.videos import write_videos


def generate(cfg: ToyworldConfig, out_dir: str | None = None, layout_seed: int | None = None) -> dict:
    """`layout_seed` draws other images and videos of the same identity catalogue (a held-out set)."""
    if cfg.caption not in CAPTION_STYLES:
        raise ValueError(f"data.toyworld.caption: {cfg.caption!r} is not one of {CAPTION_STYLES}")
    out = out_dir or cfg.out_dir
    manifest_path = os.path.join(out, "manifest.json")
    layout = cfg.seed if layout_seed is None else layout_seed
    # Through JSON, as the manifest stores it (tuples come back as lists).
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg) | {"out_dir": None, "layout_seed": layout}))
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("config") == wanted:
            return manifest
    if os.path.exists(out):
        shutil.rmtree(out)  # an incomplete or differently configured folder: start clean
    start = time.perf_counter()
    cat = catalogue(cfg.num_identities, cfg.seed)
    images = write_images(os.path.join(out, "images"), cat, cfg.num_images, cfg.image_size, cfg.max_subjects,
                          layout, cfg.png_fraction, cfg.jpeg_quality, cfg.empty_fraction, cfg.caption,
                          cfg.subject_scale, cfg.multi_subject_scale)
    videos = write_videos(os.path.join(out, "videos"), cat, cfg.num_videos, cfg.video_size, cfg.video_fps,
                          cfg.video_seconds, cfg.max_video_subjects, cfg.scene_cut_fraction, layout, cfg.caption,
                          cfg.subject_scale, cfg.multi_subject_scale)
    manifest = {"config": wanted, "images": images, "videos": videos,
                "identities": [dataclasses.asdict(i) | {"phrase": i.phrase} for i in cat]}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    print(f"toyworld: {images['images']} images, {videos['videos']} videos in {out} "
          f"({time.perf_counter() - start:.1f}s)")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="override data.toyworld.out_dir")
    ap.add_argument("--layout-seed", type=int, default=None,
                    help="other images and videos of the same identities (e.g. a held-out set)")
    ap.add_argument("--num-images", type=int, default=None, help="override data.toyworld.num_images")
    ap.add_argument("--num-videos", type=int, default=None, help="override data.toyworld.num_videos")
    args = ap.parse_args(argv)
    cfg = load_data_config(args.params).toyworld
    overrides = {k: v for k, v in (("num_images", args.num_images), ("num_videos", args.num_videos)) if v is not None}
    generate(dataclasses.replace(cfg, **overrides), args.out, args.layout_seed)


if __name__ == "__main__":
    main()
