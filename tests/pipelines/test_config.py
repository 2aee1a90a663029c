from __future__ import annotations

import pytest

from anystory.typed_config import ConfigError
from pipelines.config import load_data_config, params_hash, parse_data_config
from tests.pipelines.helpers import REPO, base_params


def test_repo_params_load_with_sources_parsed():
    cfg = load_data_config(str(REPO / "params.yaml"))
    assert cfg.sources.unpaired[0].type == "coco" and cfg.sources.paired[0].type == "video_folder"
    assert cfg.filter.max_area_frac == 0.8


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["filter"].update(min_scor=0.2), "data.filter.min_scor: unknown key"),
        (lambda d: d["filter"].update(min_score="high"), "data.filter.min_score: expected float, got 'high'"),
        (lambda d: d["shards"].update(jpeg_quality=2.5), "data.shards.jpeg_quality: expected int, got '2.5'"),
        (lambda d: d["shards"].update(images_per_shard=0), "data.shards.images_per_shard: expected PositiveInt (v>0), got '0'"),
        (lambda d: d["filter"].update(dedupe="maybe"), "data.filter.dedupe: expected bool, got 'maybe'"),
        (lambda d: d["decode"].update(max_short_side=0), "data.decode.max_short_side: expected PositiveInt (v>0), got '0'"),
        (lambda d: d.update(filter=3), "data.filter: expected a mapping, got int"),
        (lambda d: d["shards"].update(images_per_shard=None), "data.shards.images_per_shard: expected PositiveInt, got None"),
        (lambda d: d["filter"].update(score_filters=[{"name": "a", "scorer": "m:C", "min_score": None}]),
         "data.filter.score_filters.min_score: required key is missing"),  # jsonargparse names no list index
        (lambda d: d["annotate"].update(mode="magic"), "data.annotate.mode: 'magic' is not one of"),
        (lambda d: d["sources"]["unpaired"][0].update(imagez="x"), "data.sources.unpaired[0].imagez: unknown key"),
        (lambda d: d["sources"]["unpaired"][0].pop("images"), "data.sources.unpaired[0].images: required key"),
        (lambda d: d["sources"]["unpaired"][0].update(type="nope"), "data.sources.unpaired[0].type: 'nope'"),
        (lambda d: d["sources"]["paired"][0].update(name="a-b"), "data.sources.paired[0].name"),
        (lambda d: d["sources"]["paired"].append({"type": "coco", "name": "x", "annotations": "a", "images": "b"}),
         "paired shards need videos"),
        (lambda d: d.update(extra=1), "data.extra: unknown key"),
    ],
)
def test_bad_params_name_the_key(edit, message):
    data = base_params()["data"]
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_data_config(data)
    assert message in str(err.value)


def test_int_is_accepted_for_float():
    data = base_params()["data"]
    data["filter"]["min_score"] = 1
    assert parse_data_config(data).filter.min_score == 1.0


def test_params_hash_follows_content_not_runtime_settings():
    base = parse_data_config(base_params()["data"])
    runtime = base_params()["data"]
    runtime["ray"]["num_cpus"] = 7
    runtime["out_dir"] = "/elsewhere"
    runtime["annotate"]["auto"]["concurrency"] = 5
    content = base_params()["data"]
    content["filter"]["min_score"] = 0.5
    video_only = base_params()["data"]
    video_only["video"]["min_gap_s"] = 1.0
    assert params_hash(parse_data_config(runtime), "unpaired") == params_hash(base, "unpaired")
    assert params_hash(parse_data_config(content), "unpaired") != params_hash(base, "unpaired")
    assert params_hash(parse_data_config(video_only), "unpaired") == params_hash(base, "unpaired")
    assert params_hash(parse_data_config(video_only), "paired") != params_hash(base, "paired")


MODEL = {"gdino_config": "g.py", "gdino_checkpoint": "g.pth", "gdino_text_encoder": "bert", "sam_model_type": "vit_b",
         "sam_checkpoint": "s.pth"}


def test_gpus_reserved_for_a_cpu_annotator_is_an_error():
    with pytest.raises(ConfigError, match="num_gpus"):
        parse_data_config({"annotate": {"auto": {"num_gpus": 1, "model": {**MODEL, "device": "cpu"}}}})
    assert parse_data_config({"annotate": {"auto": {"num_gpus": 1, "model": {**MODEL, "device": "cuda"}}}})


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({**MODEL, "box_treshold": 0.5}, "data.annotate.auto.model.box_treshold: unknown key (allowed: box_threshold,"),
        ({k: v for k, v in MODEL.items() if k != "sam_checkpoint"},
         "data.annotate.auto.model.sam_checkpoint: required key is missing"),
        ({**MODEL, "sam_model_type": "vit_x"},
         "data.annotate.auto.model.sam_model_type: 'vit_x' is not one of ['vit_b', 'vit_l', 'vit_h', 'tiny']"),
        ({**MODEL, "sam_model_type": "tiny"}, "data.annotate.auto.model.tiny_sam: required for sam_model_type 'tiny'"),
        ({**MODEL, "tiny_sam": {}}, "data.annotate.auto.model.tiny_sam: required for sam_model_type 'tiny'"),
        ({**MODEL, "sam_model_type": "tiny", "tiny_sam": {"depth": 2}},
         "data.annotate.auto.model.tiny_sam.depth: unknown key (allowed: decoder_depth,"),
        ({**MODEL, "box_threshold": 1.5}, "data.annotate.auto.model.box_threshold: expected ClosedUnitInterval (v>=0 and v<=1), got '1.5'"),
        ({**MODEL, "box_threshold": "high"}, "data.annotate.auto.model.box_threshold: expected ClosedUnitInterval (could not convert string to float: 'high')"),
        ({**MODEL, "max_boxes_per_label": 0}, "data.annotate.auto.model.max_boxes_per_label: expected PositiveInt (v>0), got '0'"),
        ({**MODEL, "gdino_checkpoint": ""}, "data.annotate.auto.model.gdino_checkpoint: must not be empty"),
        ({**MODEL, "device": "gpu9"}, "data.annotate.auto.model.device: 'gpu9' is not a torch device"),
    ],
)
def test_the_annotator_config_is_checked_with_the_params(model, message):
    # Checked whatever the mode: a typo in a model kept for later is found now, not on the GPU machine.
    with pytest.raises(ConfigError) as err:
        parse_data_config({"annotate": {"auto": {"model": model}}})
    assert str(err.value).startswith(message)


def test_auto_mode_needs_the_model_and_its_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.annotate.auto.model: required for mode 'auto'"):
        parse_data_config({"annotate": {"mode": "auto", "auto": {"model": {}}}})
    model = {k: str(tmp_path / v) for k, v in MODEL.items() if k != "sam_model_type"}
    with pytest.raises(ConfigError) as err:
        parse_data_config({"annotate": {"mode": "auto", "auto": {"model": {**model, "sam_model_type": "vit_b"}}}})
    assert str(err.value) == f"data.annotate.auto.model.gdino_config: {tmp_path}/g.py not found"
    # mode `given` never reads them, and `model: {}` still means "no model"
    given = parse_data_config({"annotate": {"auto": {"model": {**model, "sam_model_type": "vit_b"}}}})
    assert given.annotate.auto.model.gdino_config == f"{tmp_path}/g.py"
    assert parse_data_config({"annotate": {"auto": {"model": {}}}}).annotate.auto.model is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([("filter.min_score", "0.5")], "min_score=0.5"),
        ([("filter.min_score", "x")], "data.filter.min_score: expected float, got 'x'"),
        ([("filter.nope", "1")], "data.filter.nope: unknown key (allowed: dedupe,"),
        # a prefix of a key is a typo (argparse would take it for the key)
        ([("filter.min_scor", "0.5")], "data.filter.min_scor: unknown key (allowed: dedupe,"),
        ([("filter.min_score.x", "1")], "data.filter.min_score: not a mapping, cannot set data.filter.min_score.x"),
        ([("shards.images_per_shard", "0")], "data.shards.images_per_shard: expected PositiveInt (v>0), got '0'"),
    ],
)
def test_overrides_go_through_the_same_checks(overrides, expected):
    data = base_params()["data"]
    try:
        cfg = parse_data_config(data, overrides)
    except ConfigError as err:
        assert str(err).startswith(expected)
    else:
        assert expected == f"min_score={cfg.filter.min_score}"
        assert data["filter"]["min_score"] != 0.5  # the caller's data is not edited
