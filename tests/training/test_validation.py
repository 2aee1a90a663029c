from __future__ import annotations

import lightning as L
import pytest
import torch

from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.module import Stage1Module
from training.validation import log_batch, region_losses, sample_noise, validation_logs


def test_region_losses_inside_and_outside_the_subject_masks():
    # 64 px masks over 16 x 16 latents: subject 0 the top-left 32 x 32 px (8 x 8 latents), subject 1
    # invalid (ignored). The error is 1 on the subject's latents and 0.25 elsewhere (4 channels alike).
    masks = torch.zeros(1, 2, 64, 64)
    masks[0, 0, :32, :32] = 1.0
    masks[0, 1] = 1.0
    valid = torch.tensor([[True, False]])
    noise = torch.zeros(1, 4, 16, 16)
    pred = torch.full((1, 4, 16, 16), 0.5)
    pred[..., :8, :8] = 1.0
    losses = region_losses(pred, noise, masks, valid)
    assert losses["subjects"][0].item() == pytest.approx(1.0) and losses["subjects"][1].item() == 1.0
    assert losses["background"][0].item() == pytest.approx(0.25)
    assert losses["all"][0].item() == pytest.approx(0.25 * 1.0 + 0.75 * 0.25)
    # An image without a valid subject has no inside: it does not count there.
    none = region_losses(pred, noise, masks, torch.tensor([[False, False]]))
    assert none["subjects"][1].item() == 0.0 and none["background"][0].item() == pytest.approx(pred.pow(2).mean())


def test_a_samples_noise_does_not_depend_on_its_batch():
    latents = torch.zeros(3, 4, 8, 8)
    together = sample_noise(latents, ["a", "b", "c"], 500)
    alone = sample_noise(latents[:1], ["b"], 500)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])  # other keys, other noise
    assert not torch.equal(sample_noise(latents[:1], ["b"], 200), alone)  # other timestep, other noise


def test_logged_values_weigh_each_batch_by_what_it_counts():
    calls = []
    metrics = {"router_miou/refined/t_200": (torch.tensor([1.5, 0.0]), torch.tensor([2.0, 1.0])),
               "router_miou/refined/t_800": (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])),
               "loss/full/all/t_200": (torch.tensor([0.2, 0.4]), torch.ones(2))}
    log_batch(lambda name, value, batch_size: calls.append((name, value, batch_size)), metrics,
              validation_logs([200, 800]))
    assert sorted(calls) == sorted([
        ("val/loss", pytest.approx(0.3), 2),
        ("val/router_miou", pytest.approx(1.5 / 4), 4),  # IoUs 1.5 over 4 counted maps
        ("val/router_miou_t_le_500", pytest.approx(1.5 / 3), 3),
    ])


@pytest.mark.slow
def test_stage_one_validation_logs_the_losses_and_no_router_figures(shard_dirs, tmp_path):
    module = Stage1Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"), val_timesteps=[500])
    data = ShardDataModule(train_shards=[], val_shards=[str(shard_dirs["val"])], batch_size=4, num_workers=0,
                           sample=SampleConfig(resolution=64, clip_size=32, ref_size=64, max_subjects=4))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert set(logged) == {"val/loss", "val/loss_without_subject", "val/loss_subjects",
                           "val/loss_subjects_without_subject"}
    assert logged["val/loss"] != logged["val/loss_without_subject"]  # the subject condition is on in one
