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
        (lambda d: d["filter"].update(min_score="high"), "data.filter.min_score: expected a number"),
        (lambda d: d["shards"].update(images_per_shard=2.5), "data.shards.images_per_shard: expected an integer"),
        (lambda d: d["shards"].update(images_per_shard=0), "data.shards.images_per_shard: must be >= 1"),
        (lambda d: d["filter"].update(dedupe="yes"), "data.filter.dedupe: expected bool"),
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


def test_gpus_reserved_for_a_cpu_annotator_is_an_error():
    import pytest

    from pipelines.config import ConfigError, parse_data_config

    with pytest.raises(ConfigError, match="num_gpus"):
        parse_data_config({"annotate": {"mode": "auto", "auto": {"num_gpus": 1, "model": {"device": "cpu"}}}})
    parse_data_config({"annotate": {"mode": "auto", "auto": {"num_gpus": 1, "model": {"device": "cuda"}}}})
