from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.config import ToyworldConfig
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
