from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from anystory.export import load_adapter_weights, load_export, random_export
from anystory.presets import get_preset
from anystory.tokenizer import build_clip_tokenizer
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.evaluate import evaluate, main
from training.identity import Appearances, load_catalogue, shard_identities
from training.module import Stage2Module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return random_export(get_preset("tiny"), root / "export", root / "tok")


def _batches(shard_dirs, batch_size):
    cfg = get_preset("tiny")
    data = ShardDataModule(train_shards=[], val_shards=[str(shard_dirs["val"])], batch_size=batch_size, num_workers=0,
                           sample=SampleConfig(resolution=cfg.resolution, clip_size=cfg.clip_image_size,
                                               ref_size=cfg.ref_size, max_subjects=4))
    return data, list(data.val_dataloader())


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


def test_headline_and_details_with_intervals(export_dir, shard_dirs, toy_manifest, tmp_path):
    clip_dir, dino_dir = _tiny_image_models(tmp_path)
    out = tmp_path / "metrics" / "eval.json"
    main(["--export", str(export_dir), "--shards", str(shard_dirs["val"]), "--out", str(out),
          "--catalogue", str(toy_manifest), "--sample-images", "3", "--timesteps", "300", "700", "--batch-size", "2",
          "--clip-model", str(clip_dir), "--dino-model", str(dino_dir), "--generate-steps", "2", "--device", "cpu"])
    headline = json.loads(out.read_text())
    intervals = json.loads((tmp_path / "metrics" / "eval_ci95.json").read_text())
    details = json.loads((tmp_path / "metrics" / "eval_details.json").read_text())
    figures = {"router_miou", "router_miou_t500", "condition_gain", "subject_loss_full", "subject_loss_router_off",
               "identity_full", "identity_router_off", "identity_no_condition", "blending_full",
               "blending_router_off", "identity_sampled_full", "identity_sampled_chance"}
    # The same keys in both files: `dvc metrics show` prints them as two rows of one table.
    assert set(headline) == set(intervals) == figures | {"samples"}
    assert headline["samples"] == intervals["samples"] == details["samples"] == 4
    for key in figures:  # value and "low..high" around it
        low, high = (float(x) for x in intervals[key].split(".."))
        assert low - 5e-4 <= headline[key] <= high + 5e-4, key
    assert headline["subject_loss_full"] == round(details["loss"]["full"]["subjects"]["all_t"]["value"], 4)
    # The targets themselves are the catalogue's colours: every subject reads as its own.
    target = details["identity_ceiling"]["target"]
    assert target["accuracy"]["value"] == 1.0 and target["blending"]["value"] == 0.0
    assert target["accuracy"]["n"] == 4 and target["accuracy_multi"]["n"] == 2  # 2 multi-subject images
    # Every variant is measured and the switches matter: six different whole-image losses.
    losses = {v: details["loss"][v]["all"]["all_t"]["value"] for v in details["loss"]}
    assert set(losses) == {"full", "router_off", "clip_only", "referencenet_only", "without_subject",
                           "ground_truth_routes"}
    assert len({round(v, 9) for v in losses.values()}) == 6
    full_minus_off = details["differences"]["loss"]["subjects"]["full_minus_router_off"]["all_t"]
    assert full_minus_off["value"] == pytest.approx(
        details["loss"]["full"]["subjects"]["all_t"]["value"] - details["loss"]["router_off"]["subjects"]["all_t"]["value"])
    # The first 3 images are sampled (the test shards: 1, 2 and 3 subjects): 2 of them multi-subject.
    assert details["identity_sampled"]["ground_truth_routes"]["accuracy"]["n"] == 3
    assert details["identity_sampled"]["ground_truth_routes"]["accuracy_multi"]["n"] == 2
    # The chance reading: the full model's images, so the same images count, and its paired difference.
    assert details["identity_sampled"]["chance"]["accuracy"]["n"] == 3
    chance = details["differences"]["identity_sampled"]["accuracy"]["full_minus_chance"]["all"]
    assert chance["value"] == pytest.approx(details["identity_sampled"]["full"]["accuracy"]["value"]
                                            - details["identity_sampled"]["chance"]["accuracy"]["value"])
    metrics = details["image_metrics"]
    assert metrics["samples"] == 4 and metrics["clip_t"] is not None and metrics["missing"] is not None
    for key in ("clip_i", "dino"):  # cosine similarities of generated subjects: defined, so in [-1, 1]
        assert -1.0 <= metrics[key] <= 1.0


def test_a_missing_catalogue_is_one_line_before_any_model_loads(shard_dirs, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --catalogue .*missing\.json: no such toy-world manifest$"):
        main(["--export", str(tmp_path / "no_export"), "--shards", str(shard_dirs["val"]), "--out",
              str(tmp_path / "eval.json"), "--catalogue", str(tmp_path / "missing.json")])
    assert not (tmp_path / "eval.json").exists()


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
    _, batches = _batches(shard_dirs, 2)
    halves, empty = 0, 0
    for batch in batches:
        masks = torch.zeros_like(batch["masks"])
        width = masks.shape[-1]
        masks[:, 0, :, : width // 2] = 1.0
        masks[:, 1, :, width // 2 :] = 1.0
        batch["masks"] = masks * batch["valid"][:, :, None, None]
        halves += int(batch["valid"][:, 0].sum())
        empty += int(batch["valid"][:, 1].sum())
    assert halves == 4 and empty == 2  # the val shards: 1, 2, 3, 1 subjects (the third's right half: empty)
    expected = 0.5 * halves / (halves + empty)

    miou = evaluate(model, components, batches, [300, 700])["router_miou"]
    for kind in ("refined", "coarse"):
        sizes = [k for k in miou[kind] if k.startswith("res_")]
        assert sizes
        for node in [miou[kind], *(miou[kind][s] for s in sizes)]:
            for group in ("all_t", "t_le_500", "t_300", "t_700"):
                figure = node[group]
                # Two images of one subject (IoU 1/2 each) and two of two counted subjects (1/2 and 0):
                # a resample of four images drawn only from one kind (probability 1/16 each, above
                # the 2.5% tails) gives 1/2 or 1/4, so the 95% interval is exactly [1/4, 1/2].
                assert [figure["value"], figure["low"], figure["high"]] == pytest.approx([expected, 0.25, 0.5],
                                                                                        abs=1e-12)
    assert miou["all_background"]["all_t"]["value"] == 0.0


def test_the_training_loop_logs_what_the_evaluation_reports(export_dir, shard_dirs, toy_manifest, tmp_path):
    """Same checkpoint, same held-out data, other batch sizes (2 in the loop, 4 in the evaluation): the
    figures agree, since both run training.validation.batch_metrics with noise seeded per sample."""
    module = Stage2Module(preset="tiny", base_dir=str(export_dir / "base"), val_timesteps=[300, 700],
                          tokenizer_dir=str(tmp_path / "tok"))
    module.configure_model()
    load_adapter_weights(module.model, export_dir / "anystory.safetensors")
    data, _ = _batches(shard_dirs, 2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]

    model, components = load_export(export_dir, device="cpu")
    _, batches = _batches(shard_dirs, 4)
    appearances = Appearances.of(load_catalogue(toy_manifest))
    details = evaluate(model, components, batches, [300, 700], appearances, shard_identities([str(shard_dirs["val"])]))
    reported = {
        "val/loss": details["loss"]["full"]["all"]["all_t"],
        "val/loss_without_subject": details["loss"]["without_subject"]["all"]["all_t"],
        "val/loss_subjects": details["loss"]["full"]["subjects"]["all_t"],
        "val/loss_subjects_without_subject": details["loss"]["without_subject"]["subjects"]["all_t"],
        "val/router_miou": details["router_miou"]["refined"]["all_t"],
        "val/router_miou_t_le_500": details["router_miou"]["refined"]["t_le_500"],
    }
    assert set(logged) == set(reported)
    for name, figure in reported.items():
        assert logged[name] == pytest.approx(figure["value"], rel=1e-4, abs=1e-6), name
