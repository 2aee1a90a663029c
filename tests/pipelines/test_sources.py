from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

from pipelines.batch import from_rows
from pipelines.config import DecodeConfig
from pipelines.sources import build_source
from pipelines.sources.coco import CocoConfig
from pipelines.sources.hf_dataset import HfDatasetConfig
from pipelines.sources.image_folder import ImageFolderConfig
from pipelines.sources.video_folder import VideoFolderConfig
from pipelines.sources.wds_shards import WdsConfig
from pipelines.stages.annotate_given import AnnotateGiven
from pipelines.stages.decode import DecodeImages


def coco(toy_dir):
    with open(f"{toy_dir}/images/annotations.json") as f:
        return json.load(f)


def read_all(cfg, per_shard=4):
    src = build_source(cfg)
    plan = src.plan(per_shard)
    assert plan == build_source(cfg).plan(per_shard)  # deterministic
    return plan, [r for units in plan for r in src.read(units)]


def annotated(records):
    return AnnotateGiven()(DecodeImages(DecodeConfig())(from_rows(records)))


def test_coco_source_reads_images_captions_and_masks(toy_dir):
    plan, recs = read_all(CocoConfig(name="t", annotations=f"{toy_dir}/images/annotations.json",
                                     images=f"{toy_dir}/images"))
    data = coco(toy_dir)
    assert [len(u) for u in plan] == [4] * 6 and len(recs) == len(data["images"])
    out = annotated(recs)
    n_ann = sum(len(s) for s in out["subjects"])
    assert n_ann == len(data["annotations"]) and all(r is None for r in out["reject"])
    assert all(r["caption"].startswith("a photo of") for r in recs)


def test_image_folder_source(tmp_path, toy_dir):
    data = coco(toy_dir)
    lines = []
    for img in data["images"][:5]:
        os.link(f"{toy_dir}/images/{img['file_name']}", tmp_path / img["file_name"])
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        lines.append({"file": img["file_name"], "caption": img["caption"], "annotations": anns})
    lines.append({"file": "missing.jpg", "caption": "gone"})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in reversed(lines)) + "\n")
    plan, recs = read_all(ImageFolderConfig(name="f", path=str(tmp_path)), per_shard=10)
    assert [r["source_id"] for r in recs] == sorted(x["file"] for x in lines)  # file order, not line order
    out = annotated(recs)
    assert out["reject"].count("read_error") == 1
    assert sum(len(s or []) for s in out["subjects"]) == sum(len(x.get("annotations", [])) for x in lines)


def write_img2dataset_tar(path, toy_dir, images, truncate=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k, img in enumerate(images):
            raw = open(f"{toy_dir}/images/{img['file_name']}", "rb").read()
            meta = json.dumps({"caption": img["caption"], "labels": ["thing"]}).encode()
            for ext, payload in (("jpg", raw), ("json", meta), ("txt", img["caption"].encode())):
                ti = tarfile.TarInfo(f"{k:09d}.{ext}")
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if truncate else data)


def test_webdataset_source_img2dataset_layout(tmp_path, toy_dir):
    imgs = coco(toy_dir)["images"]
    write_img2dataset_tar(tmp_path / "00000.tar", toy_dir, imgs[:3])
    write_img2dataset_tar(tmp_path / "00001.tar", toy_dir, imgs[3:9], truncate=True)
    plan, recs = read_all(WdsConfig(name="w", path=f"{tmp_path}/*.tar"))
    assert len(plan) == 2  # one output shard per input tar
    assert [r["source_id"] for r in recs[:3]] == [f"00000.tar/{k:09d}" for k in range(3)]
    assert recs[0]["caption"] == imgs[0]["caption"] and recs[0]["labels"] == ["thing"]
    assert recs[-1]["reject"] == "read_error"  # the truncated tar: what was complete is kept, the rest counted
    out = DecodeImages(DecodeConfig())(from_rows(recs))
    assert out["reject"][:3] == [None, None, None]


def test_hf_dataset_source_from_a_local_path(tmp_path, toy_dir):
    import datasets

    data = coco(toy_dir)
    rows = {"image": [], "caption": [], "objects": []}
    for img in data["images"][:6]:
        rows["image"].append(f"{toy_dir}/images/{img['file_name']}")
        rows["caption"].append(img["caption"])
        rows["objects"].append([{"label": a["label"] if "label" in a else "shape", "segmentation": a["segmentation"]}
                                for a in data["annotations"] if a["image_id"] == img["id"]
                                and isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)])
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    plan, recs = read_all(HfDatasetConfig(name="h", path=str(tmp_path / "hf"), annotations_column="objects"))
    assert [len(u) for u in plan] == [4, 2]
    out = annotated(recs)
    assert all(r is None for r in out["reject"])
    assert [len(s) for s in out["subjects"]] == [len(o) for o in rows["objects"]]
    assert recs[0]["caption"] == rows["caption"][0]
    np.testing.assert_array_equal(out["image"][0].shape, (96, 96, 3))


def test_video_folder_source_with_sidecars(tmp_path, toy_dir):
    plan, recs = read_all(VideoFolderConfig(name="v", path=f"{toy_dir}/videos"), per_shard=4)
    assert [len(u) for u in plan] == [4, 2]
    assert all(r["frame_annotations"] is not None and len(r["frame_annotations"]) == 16 for r in recs)
    (tmp_path / "plain.mp4").write_bytes(open(f"{toy_dir}/videos/clip_0000.mp4", "rb").read())
    _, recs = read_all(VideoFolderConfig(name="v", path=str(tmp_path)))
    assert recs[0]["frame_annotations"] is None and recs[0]["caption"] == ""
