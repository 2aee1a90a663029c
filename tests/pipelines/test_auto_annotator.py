"""`auto` annotation with tiny random-weight GroundingDINO + SAM written to files (no network; the real
groundingdino / segment_anything code runs, nothing stands in for it).

Random weights make detections arbitrary, so these tests check contracts (geometry, labels, thresholds,
error isolation, determinism), not detection quality.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from anystory.typed_config import parse
from pipelines.auto_annotator import (
    AutoAnnotator,
    assign_labels,
    build_prompt,
    build_tiny_sam,
    clean_labels,
    extract_noun_phrases,
    label_token_map,
    load_weights,
)
from pipelines.config import AutoAnnotateConfig, TinySamSizes
from pipelines.tiny_detectors import write_tiny_detectors

CAPTIONS = ["a red ball and a small dog on the grass", "a cat sitting next to a wooden chair"]


def _no_network(*args: object, **kwargs: object) -> None:
    raise OSError("network access attempted in an offline test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoAnnotateConfig, AutoAnnotator]:
    # Any connection attempt while writing or loading the models fails the setup.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        config = write_tiny_detectors(tmp_path_factory.mktemp("tiny_detectors"), seed=0)
        return config, AutoAnnotator(config)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((200, 300), (240, 160)):  # non-square, different sizes (separate GroundingDINO forwards)
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        image[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 30)
        out.append(image)
    return out


def _state(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


# --- labels and prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A photo of a red ball and a small dog on the grass.", ["red ball", "small dog", "grass"]),
        ("Two cats sitting next to a wooden chair", ["cats", "wooden chair"]),
        ("A woman wearing a blue hat, holding an umbrella.", ["woman", "blue hat", "umbrella"]),
        ("the man's hat near a tall building", ["man", "hat", "tall building"]),
        ("a big fluffy white dog", ["fluffy white dog"]),
        ("A close-up of a striped t-shirt on a bed", ["striped t-shirt", "bed"]),
        ("a dog and a dog", ["dog"]),
        ("it is there", []),
        ("", []),
    ],
)
def test_extract_noun_phrases(caption: str, expected: list[str]) -> None:
    assert extract_noun_phrases(caption) == expected


def test_clean_labels_and_prompt() -> None:
    assert clean_labels(["Red  Ball", "dog.", "red ball", " ", "St. Bernard"]) == ["red ball", "dog", "st bernard"]
    prompt, spans = build_prompt(["red ball", "dog"])
    assert prompt == "red ball . dog ."
    assert [prompt[a:b] for a, b in spans] == ["red ball", "dog"]


def test_label_token_map_covers_each_label_only(tiny: tuple[AutoAnnotateConfig, AutoAnnotator]) -> None:
    tokenizer = tiny[1].gdino.tokenizer
    prompt, spans = build_prompt(["red ball", "zebra"])  # "zebra" is not a whole-word token: letter pieces
    token_map = label_token_map(tokenizer, prompt, spans, max_text_len=256)
    ids = tokenizer(prompt)["input_ids"]
    for row, label in enumerate(["red ball", "zebra"]):
        positions = token_map[row].nonzero()[:, 0].tolist()
        assert tokenizer.decode([ids[p] for p in positions]).replace(" ", "") == label.replace(" ", "")
    assert not (token_map[0] & token_map[1]).any()
    assert not token_map[:, 0].any()  # [CLS] belongs to no label


def test_assign_labels_thresholds_and_token_share() -> None:
    token_map = torch.zeros(2, 8, dtype=torch.bool)
    token_map[0, 1:3] = True  # label 0: tokens 1, 2
    token_map[1, 4] = True  # label 1: token 4
    probs = torch.zeros(4, 8)
    probs[0, [1, 2]] = torch.tensor([0.5, 0.5])  # all of label 0 -> label 0
    probs[1, [1, 4]] = torch.tensor([0.9, 0.6])  # half of label 0 vs all of label 1 -> label 1, score 0.6
    probs[2, 3] = 0.99  # a separator token alone is no label
    probs[3, 4] = 0.2  # below box threshold
    query, label, score = assign_labels(probs, token_map, box_threshold=0.3, text_threshold=0.25)
    assert query.tolist() == [0, 1]
    assert label.tolist() == [0, 1]
    assert score.tolist() == pytest.approx([0.5, 0.6])
    assert assign_labels(probs, token_map, box_threshold=0.3, text_threshold=0.95)[0].numel() == 0


# --- config ---------------------------------------------------------------------------------------------------
def test_config_dict_round_trip(tiny: tuple[AutoAnnotateConfig, AutoAnnotator]) -> None:
    # (the checks of its values: tests/pipelines/test_config.py, with the rest of params.yaml)
    config = tiny[0]
    params = json.loads(json.dumps(config.to_dict()))  # what a params.yaml section holds
    assert parse(AutoAnnotateConfig, params, "model") == config
    written = json.loads((Path(config.gdino_config).parent / "auto_annotate.json").read_text())
    assert parse(AutoAnnotateConfig, written, "model") == config
    assert config.tiny_sam == TinySamSizes() and isinstance(config.tiny_sam.encoder_global_attn_indexes, tuple)


# --- tiny models ----------------------------------------------------------------------------------------------
def test_annotator_holds_the_written_weights(tiny: tuple[AutoAnnotateConfig, AutoAnnotator]) -> None:
    config, annotator = tiny
    for model, path in ((annotator.gdino, config.gdino_checkpoint), (annotator.sam.model, config.sam_checkpoint)):
        saved = _state(path)
        loaded = model.state_dict()
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)
    # A fresh build differs, so the equality above comes from loading the files.
    torch.manual_seed(1234)
    fresh = build_tiny_sam(config.tiny_sam).state_dict()
    assert not torch.equal(fresh["mask_decoder.iou_token.weight"], _state(config.sam_checkpoint)["mask_decoder.iou_token.weight"])


def test_load_weights_safetensors_and_mismatches(tiny: tuple[AutoAnnotateConfig, AutoAnnotator], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    config = tiny[0]
    saved = _state(config.sam_checkpoint)
    save_file(saved, str(tmp_path / "sam.safetensors"))
    sam = build_tiny_sam(config.tiny_sam)
    load_weights(sam, str(tmp_path / "sam.safetensors"))
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in saved.items())
    torch.save({**saved, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="extra.weight"):
        load_weights(sam, str(tmp_path / "extra.pth"))
    torch.save({k: v for k, v in saved.items() if k != "mask_decoder.iou_token.weight"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        load_weights(sam, str(tmp_path / "short.pth"))
    with pytest.raises(ValueError, match="size mismatch"):
        load_weights(build_tiny_sam(dataclasses.replace(config.tiny_sam, prompt_embed_dim=16)), config.sam_checkpoint)


def _check_subjects(row: list[dict], image: np.ndarray, labels: list[str], config: AutoAnnotateConfig) -> None:
    h, w = image.shape[:2]
    assert row, "seeded tiny models detect something at the default thresholds"
    for subject in row:
        x0, y0, x1, y1 = subject["bbox"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert subject["label"] in labels
        assert config.box_threshold < subject["score"] <= 1.0
        mask = subject["mask"]
        assert mask.dtype == bool and mask.shape == (h, w) and mask.any()
        ys, xs = np.nonzero(mask)
        dx, dy = config.mask_box_margin * (x1 - x0), config.mask_box_margin * (y1 - y0)
        assert xs.min() >= math.floor(x0 - dx) and xs.max() < math.ceil(x1 + dx)
        assert ys.min() >= math.floor(y0 - dy) and ys.max() < math.ceil(y1 + dy)
    counts = {label: sum(s["label"] == label for s in row) for label in labels}
    assert max(counts.values()) <= config.max_boxes_per_label


def test_annotates_caption_and_label_rows(tiny: tuple[AutoAnnotateConfig, AutoAnnotator], images: list[np.ndarray]) -> None:
    config, annotator = tiny
    flipped = images[0][::-1].copy()  # same size as images[0]: both go through one batched forward
    batch = {
        "image": [*images, flipped],
        "caption": [*CAPTIONS, "ignored when labels are given"],
        "labels": [None, ["Chair", "cat."], ["dog"]],
        "key": ["a", "b", "c"],
    }
    out = annotator(batch)
    assert out["key"] == ["a", "b", "c"] and out["image"] is batch["image"]
    assert out["annotate_error"] == [None, None, None]
    _check_subjects(out["subjects"][0], images[0], extract_noun_phrases(CAPTIONS[0]), config)
    _check_subjects(out["subjects"][1], images[1], ["chair", "cat"], config)
    _check_subjects(out["subjects"][2], flipped, ["dog"], config)


def test_thresholds_and_mask_margin(tiny: tuple[AutoAnnotateConfig, AutoAnnotator], images: list[np.ndarray]) -> None:
    config, annotator = tiny
    batch = {"image": images, "caption": CAPTIONS}
    assert all(annotator(batch)["subjects"])  # the defaults detect something in both images
    for strict in ({"box_threshold": 1.0}, {"text_threshold": 1.0}):
        out = AutoAnnotator(dataclasses.replace(config, **strict))(batch)
        assert out["subjects"] == [[], []] and out["annotate_error"] == [None, None]
    tight = dataclasses.replace(config, mask_box_margin=0.0, max_boxes_per_label=1)
    out = AutoAnnotator(tight)(batch)
    for row, image, caption in zip(out["subjects"], images, CAPTIONS, strict=True):
        _check_subjects(row, image, extract_noun_phrases(caption), tight)


def test_bad_rows_get_errors_and_good_rows_are_unaffected(
    tiny: tuple[AutoAnnotateConfig, AutoAnnotator], images: list[np.ndarray]
) -> None:
    annotator = tiny[1]
    good = annotator({"image": images[:1], "caption": CAPTIONS[:1]})
    batch = {
        "image": [np.zeros((1, 1, 3), np.uint8), images[0], images[0].astype(np.float32), images[0][..., 0],
                  images[1], images[1], np.zeros((16, 20000, 3), np.uint8)],  # last: resizes to zero pixels
        "caption": ["a dog", CAPTIONS[0], "a dog", "a dog", "it is there", "a dog", "a dog"],
        "labels": [None, None, None, None, None, [" . "], None],
    }
    out = annotator(batch)
    errors = out["annotate_error"]
    assert errors[1] is None
    reasons = [e.reason for i, e in enumerate(errors) if i != 1]
    assert reasons == ["bad_image"] * 3 + ["no_labels"] * 2 + ["detector_failed"]
    assert errors[0].detail == f"1x1 is below min_image_side={annotator.config.min_image_side}"
    assert "float32" in errors[2].detail and "HxWx3" in errors[3].detail
    assert "caption" in errors[4].detail and "label list" in errors[5].detail
    assert [out["subjects"][i] for i in (0, 2, 3, 4, 5, 6)] == [[]] * 6
    _assert_same_subjects(out["subjects"][1], good["subjects"][0])


def test_a_model_failure_rejects_only_its_row(
    tiny: tuple[AutoAnnotateConfig, AutoAnnotator], images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Faults injected around the annotator's own steps; the real models still run for the other rows.
    annotator = tiny[1]
    alone = annotator({"image": images[1:], "caption": CAPTIONS[1:]})
    detect, segment = annotator._detect, annotator._segment

    def failing_detect(rows: list, tensors: list) -> list:
        if any("boom" in row.labels for row in rows):
            raise RuntimeError("detector exploded")
        return detect(rows, tensors)

    def failing_segment(image: np.ndarray, detections: list) -> list:
        if image.shape[:2] == images[0].shape[:2]:
            raise RuntimeError("segmenter exploded")
        return segment(image, detections)

    monkeypatch.setattr(annotator, "_detect", failing_detect)
    out = annotator({"image": images, "caption": CAPTIONS, "labels": [["boom"], None]})
    assert out["annotate_error"] == [("detector_failed", "RuntimeError: detector exploded"), None]
    _assert_same_subjects(out["subjects"][1], alone["subjects"][0])
    monkeypatch.setattr(annotator, "_detect", detect)
    monkeypatch.setattr(annotator, "_segment", failing_segment)
    out = annotator({"image": images, "caption": CAPTIONS})
    assert out["annotate_error"] == [("segmenter_failed", "RuntimeError: segmenter exploded"), None]
    assert out["subjects"][0] == []
    _assert_same_subjects(out["subjects"][1], alone["subjects"][0])


def _assert_same_subjects(a: list[dict], b: list[dict]) -> None:
    assert [(s["label"], s["bbox"], s["score"], s["mask_score"]) for s in a] == [
        (s["label"], s["bbox"], s["score"], s["mask_score"]) for s in b
    ]
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a, b, strict=True))


def test_same_seed_same_weights_and_outputs(
    tiny: tuple[AutoAnnotateConfig, AutoAnnotator], images: list[np.ndarray], tmp_path: Path
) -> None:
    config, annotator = tiny
    again = write_tiny_detectors(tmp_path / "again", seed=0)
    other = write_tiny_detectors(tmp_path / "other", seed=1)
    for key in ("gdino_checkpoint", "sam_checkpoint"):
        ref, same, diff = (_state(getattr(c, key)) for c in (config, again, other))
        assert all(torch.equal(ref[k], same[k]) for k in ref)
        assert not all(torch.equal(ref[k], diff[k]) for k in ref)
    batch = {"image": images, "caption": CAPTIONS}
    first, second = annotator(batch), AutoAnnotator(again)(batch)
    for a, b in zip(first["subjects"], second["subjects"], strict=True):
        _assert_same_subjects(a, b)


def test_tiny_sam_sizes_are_explicit() -> None:
    sam = build_tiny_sam(TinySamSizes(image_size=128, encoder_embed_dim=32))
    assert sam.image_encoder.img_size == 128
    assert sam.prompt_encoder.image_embedding_size == (8, 8)
