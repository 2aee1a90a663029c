from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from anystory.typed_config import ConfigError
from pipelines.config import ToyworldConfig, parse_data_config
from pipelines.masks import segmentation_to_mask
from pipelines.toyworld.catalogue import catalogue
from pipelines.toyworld.generate import generate
from tests.pipelines.helpers import SMALL_TOYWORLD


def tree_hashes(root: str) -> dict[str, str]:
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_catalogue_is_fixed_and_distinct():
    a, b = catalogue(16, 0), catalogue(16, 0)
    assert a == b
    assert len({(i.shape, i.texture, i.colour) for i in a}) == 16
    assert len({i.shape for i in a}) == 7  # spread over every shape


def test_generation_is_deterministic(tmp_path, toy_dir):
    again = generate(ToyworldConfig(**SMALL_TOYWORLD, out_dir=str(tmp_path / "again")))
    assert tree_hashes(toy_dir) == tree_hashes(str(tmp_path / "again"))
    assert again["images"]["images"] == SMALL_TOYWORLD["num_images"]


def test_images_and_coco_masks_agree(toy_dir):
    with open(os.path.join(toy_dir, "images", "annotations.json")) as f:
        coco = json.load(f)
    kinds = set()
    identities = []
    for ann in coco["annotations"]:
        img = coco["images"][ann["image_id"]]
        m = segmentation_to_mask(ann["segmentation"], img["height"], img["width"])
        kinds.add("polygon" if isinstance(ann["segmentation"], list) else type(ann["segmentation"]["counts"]).__name__)
        assert m.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        identities.append(ann["identity"])
    assert kinds == {"polygon", "str", "list"}  # every segmentation form a COCO reader must handle
    # identities recur across images: that is what makes pairs possible
    assert max(np.bincount(identities)) >= 2
    for img in coco["images"]:
        with Image.open(os.path.join(toy_dir, "images", img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_videos_decode_and_frames_are_annotated(toy_dir):
    vids = sorted(Path(toy_dir, "videos").glob("*.mp4"))
    assert len(vids) == SMALL_TOYWORLD["num_videos"]
    cuts = 0
    for v in vids:
        side = json.loads(v.with_suffix(".json").read_text())
        with av.open(str(v)) as c:
            n = sum(1 for _ in c.decode(video=0))
        assert n == side["num_frames"] == len(side["frames"]) == 16
        cuts += bool(side["scene_cuts"])
        for fr in side["frames"]:
            for ann in fr["annotations"]:
                m = segmentation_to_mask(ann["segmentation"], side["height"], side["width"])
                assert m.sum() == ann["area"]
                assert ann["identity"] in side["identities"]
    assert 0 < cuts < len(vids)  # some with a scene cut, some without


def test_label_captions_name_shapes_only_and_keep_the_scenes(tmp_path, toy_dir):
    cfg = dict(SMALL_TOYWORLD, num_videos=1)
    generate(ToyworldConfig(**cfg, out_dir=str(tmp_path / "phrase")))
    generate(ToyworldConfig(**cfg, out_dir=str(tmp_path / "label"), caption="label"))
    phrase, label = tree_hashes(str(tmp_path / "phrase")), tree_hashes(str(tmp_path / "label"))
    # Same pixels; only the caption-bearing JSON differs.
    assert {k: v for k, v in phrase.items() if not k.endswith(".json")} == \
        {k: v for k, v in label.items() if not k.endswith(".json")}
    by_id = {}
    for style in ("phrase", "label"):
        coco = json.loads((tmp_path / style / "images" / "annotations.json").read_text())
        by_id[style] = {im["id"]: im["caption"] for im in coco["images"]}
        anns = coco["annotations"]
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
    for image_id, text in by_id["label"].items():
        shapes = [cats[a["category_id"]] for a in anns if a["image_id"] == image_id]
        assert all(f"a {s}" in text for s in shapes), text
        assert not any(c in text.split() for c in colours), text
        assert by_id["phrase"][image_id] != text or not shapes
    clip = json.loads(next((tmp_path / "label" / "videos").glob("*.json")).read_text())
    assert not any(c in clip["caption"].split() for c in colours)
    with pytest.raises(ValueError, match="data.toyworld.caption"):
        generate(ToyworldConfig(**cfg, out_dir=str(tmp_path / "bad"), caption="poem"))
    assert not (tmp_path / "bad").exists()


def test_subject_scale_sets_the_drawn_radius_and_is_checked(tmp_path):
    # A shape of radius r reaches r from its centre somewhere, and no vertex lies farther than 1.06 r
    # (the cross's corners, sqrt(1 + 0.33^2) r; every other shape's are within r), so the larger bbox side
    # of an unoccluded subject lies in [r, 2.12 r], give or take the 2 pixels that rasterisation adds.
    # `place` keeps a draw only when each subject keeps 40% of itself visible, so a multi-subject bbox
    # can be clipped by occlusion and is checked from above only.
    size = 96
    cfg = dict(SMALL_TOYWORLD, image_size=size, num_images=40, num_videos=0,
               subject_scale=(0.36, 0.38), multi_subject_scale=(0.26, 0.28))
    generate(ToyworldConfig(**cfg, out_dir=str(tmp_path / "big")))
    coco = json.loads((tmp_path / "big" / "images" / "annotations.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(coco["images"]))
    singles = multis = 0
    for ann in coco["annotations"]:
        side = max(ann["bbox"][2:])
        if per_image[ann["image_id"]] == 1:
            assert 0.36 * size - 2 <= side <= 2.12 * 0.38 * size + 2, ann["bbox"]
            singles += 1
        else:
            assert side <= 2.12 * 0.28 * size + 2, ann["bbox"]
            multis += 1
    assert singles > 3 and multis > 3
    # With the default scales a multi-subject bbox stays within the default radius (0.1..0.22).
    default = generate(ToyworldConfig(**dict(cfg, subject_scale=(0.18, 0.32), multi_subject_scale=(0.1, 0.22)),
                                      out_dir=str(tmp_path / "default")))
    assert default["images"]["images"] == 40
    coco = json.loads((tmp_path / "default" / "images" / "annotations.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(coco["images"]))
    assert max(max(a["bbox"][2:]) for a in coco["annotations"] if per_image[a["image_id"]] > 1) <= 2.12 * 0.22 * size + 2
    with pytest.raises(ConfigError, match=r"data.toyworld.multi_subject_scale: \[0.3, 0.2\]"):
        parse_data_config({"toyworld": {"multi_subject_scale": [0.3, 0.2]}})
