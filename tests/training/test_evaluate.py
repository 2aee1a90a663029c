from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from anystory.export import load_export, random_export
from anystory.presets import get_preset
from anystory.tokenizer import build_clip_tokenizer
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.evaluate import evaluate, main

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
    assert set(result["ablations_val_loss"]) == {"both", "clip_only", "referencenet_only", "router_off",
                                                 "ground_truth_routes"}
    assert result["ablations_val_loss"]["both"] == result["val_loss"]["with_subject"]
    # The switches matter: each ablation gives another loss.
    assert len({round(v, 9) for v in result["ablations_val_loss"].values()}) == 5
    metrics = result["image_metrics"]
    assert metrics["samples"] == 4 and metrics["clip_t"] is not None
    assert metrics["missing"] is not None
    for key in ("clip_i", "dino"):  # cosine similarities of 4 generated subjects: defined, so in [-1, 1]
        assert -1.0 <= metrics[key] <= 1.0


def test_router_miou_of_a_router_that_routes_everything_to_the_first_subject(export_dir, shard_dirs):
    """A hand-built case with a known answer. With its latent projections zeroed, every router's coarse
    and refined logits are equal over the valid routes, so the argmax routes every position to route 0
    (the first subject). The masks are replaced by hand: subject 0 the left half of the image, subject 1
    (where valid) the right half, the rest empty. At every router size (all even) subject 0 then has
    IoU 1/2 (predicted everywhere, true on half), subject 1 IoU 0 (never predicted), empty masks do not
    count, and the all-background baseline predicts no subject: IoU 0."""
    model, components = load_export(export_dir, device="cpu")
    with torch.no_grad():
        for proc in model.adapters.values():
            if hasattr(proc, "router"):
                for layer in (proc.router.coarse_latent, proc.router.refined_latent):
                    layer.weight.zero_()
                    layer.bias.zero_()
    cfg = model.config
    data = ShardDataModule(train_shards=[], val_shards=[str(shard_dirs["val"])], batch_size=2, num_workers=0,
                           sample=SampleConfig(resolution=cfg.resolution, clip_size=cfg.clip_image_size,
                                               ref_size=cfg.ref_size, max_subjects=4))
    batches = list(data.val_dataloader())
    halves, empty = 0, 0
    for batch in batches:
        masks = torch.zeros_like(batch["masks"])
        width = masks.shape[-1]
        masks[:, 0, :, : width // 2] = 1.0
        masks[:, 1, :, width // 2 :] = 1.0
        batch["masks"] = masks * batch["valid"][:, :, None, None]
        halves += int(batch["valid"][:, 0].sum())
        empty += int(batch["valid"][:, 1].sum())
    assert halves == 4 and empty >= 1  # the val shards: every sample has a subject, some a second
    expected = 0.5 * halves / (halves + empty)

    result = evaluate(model, components, batches, [300, 700])
    miou = result["router_miou"]
    for kind in ("refined", "coarse"):
        per_key = miou[kind]
        assert {"overall", "t_300", "t_700"} <= set(per_key) and any(k.startswith("res_") for k in per_key)
        assert per_key == pytest.approx(dict.fromkeys(per_key, expected), abs=1e-12)
    assert set(miou["all_background"].values()) == {0.0}
    assert result["router_miou_margin_over_trivial"] == pytest.approx(
        expected - max(0.0, miou["uniform_random"]["overall"]), abs=1e-12)
