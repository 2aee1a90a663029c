from __future__ import annotations

import json

import pytest
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from anystory.export import random_export
from anystory.presets import get_preset
from anystory.tokenizer import build_clip_tokenizer
from training.evaluate import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return random_export(get_preset("tiny"), root / "export", root / "tok")


def _tiny_image_models(root):
    clip_dir, dino_dir = root / "clip", root / "dino"
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    clip.save_pretrained(clip_dir)
    build_clip_tokenizer(root / "tok").save_pretrained(clip_dir)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def test_eval_json_has_every_metric_and_consistent_baselines(export_dir, shard_dirs, tmp_path):
    clip_dir, dino_dir = _tiny_image_models(tmp_path)
    out = tmp_path / "metrics" / "eval.json"
    main(["--export", str(export_dir), "--shards", str(shard_dirs["val"]), "--out", str(out),
          "--timesteps", "300", "700", "--batch-size", "2", "--clip-model", str(clip_dir),
          "--dino-model", str(dino_dir), "--generate-steps", "2", "--device", "cpu"])
    result = json.loads(out.read_text())
    assert result["samples"] == 4
    miou = result["router_miou"]
    assert set(miou) == {"refined", "coarse", "all_background", "uniform_random"}
    assert miou["all_background"]["overall"] == 0.0  # no subject position is ever predicted
    assert 0.0 < miou["uniform_random"]["overall"] < 1.0
    assert {"t_300", "t_700"} <= set(miou["refined"]) and any(k.startswith("res_") for k in miou["refined"])
    best = max(miou["all_background"]["overall"], miou["uniform_random"]["overall"])
    assert result["router_miou_margin_over_trivial"] == pytest.approx(miou["refined"]["overall"] - best)
    loss = result["val_loss"]
    assert loss["relative_gain"] == pytest.approx(1 - loss["with_subject"] / loss["without_subject"])
    assert set(result["ablations_val_loss"]) == {"both", "clip_only", "referencenet_only", "router_off",
                                                 "ground_truth_routes"}
    assert result["ablations_val_loss"]["both"] == loss["with_subject"]
    assert loss["relative_gain_with_ground_truth_routes"] == pytest.approx(
        1 - result["ablations_val_loss"]["ground_truth_routes"] / loss["without_subject"])
    # The switches matter: each ablation gives another loss.
    assert len({round(v, 9) for v in result["ablations_val_loss"].values()}) == 5
    metrics = result["image_metrics"]
    assert metrics["samples"] == 4 and metrics["clip_t"] is not None
    assert metrics["missing"] is not None
    for key in ("clip_i", "dino"):
        assert metrics[key] is None or -1.0 <= metrics[key] <= 1.0
