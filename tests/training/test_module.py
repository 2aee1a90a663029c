from __future__ import annotations

import importlib.util
import math

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from anystory.components import SDXL_SCHEDULER
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig
from training.diffusion import min_snr_weights, training_noise
from training.module import Stage1Module, lr_factor
from training.optim import OptimizerUnavailable, build_optimizer


def test_constant_schedule_warms_up_then_holds():
    f = lr_factor("constant", warmup_steps=4, total_steps=-1)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(10**6) == 1.0


def test_cosine_schedule_decays_to_zero_at_max_steps():
    f = lr_factor("cosine", warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0
    after = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never rises after warm-up
    assert f(60) == pytest.approx(0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.0, abs=1e-12) and f(500) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_schedule_errors_name_the_setting():
    with pytest.raises(ValueError, match="lr_decay"):
        lr_factor("linear", 0, 100)
    with pytest.raises(ValueError, match="max_steps"):
        lr_factor("cosine", 10, -1)  # no trainer.max_steps: a cosine has nowhere to end


def test_cosine_run_shorter_than_its_warmup_only_warms_up():
    f = lr_factor("cosine", warmup_steps=10, total_steps=3)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])


# ----- loss and step controls -----
def _alphas_cumprod_by_hand() -> np.ndarray:
    # SDXL's "scaled_linear" betas: linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_min_snr_weighting_changes_the_loss_as_defined():
    module = Stage1Module(snr_gamma=5.0)
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    timesteps = torch.tensor([0, 40, 300, 999])
    generator = torch.Generator().manual_seed(0)
    pred, noise = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(2))

    alpha_bar = _alphas_cumprod_by_hand()[timesteps.numpy()]
    snr = alpha_bar / (1.0 - alpha_bar)
    weights = np.minimum(snr, 5.0) / snr
    per_sample = ((pred - noise).double() ** 2).mean(dim=(1, 2, 3)).numpy()
    expected = float((weights * per_sample).mean())

    got = min_snr_weights(scheduler, timesteps, 5.0)
    assert got.numpy() == pytest.approx(weights, rel=1e-4)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # t=0 (SNR ~1000) is damped, t=999 (SNR < 5) is not
    loss = module.diffusion_loss(pred, noise, got)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(module.diffusion_loss(pred, noise)) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert float(loss) < float(module.diffusion_loss(pred, noise))


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    latents = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(0)
    plain = training_noise(latents, 0.0)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.randn_like(latents))  # no offset: the noise as before
    torch.manual_seed(0)
    shifted = training_noise(latents, 0.1)
    delta = shifted - plain
    per_channel = delta[:, :, :1, :1]
    assert torch.allclose(delta, per_channel.expand_as(delta))  # constant over the image
    assert per_channel.flatten().unique().numel() == 12  # one draw per sample and channel
    assert 0.0 < float(per_channel.abs().max()) < 0.5  # 0.1 x a standard normal draw


def test_adamw8bit_without_bitsandbytes_is_one_line_naming_the_key():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    module = Stage1Module(optimizer="adamw8bit")  # builds: exports of such a run need no bitsandbytes
    with pytest.raises(OptimizerUnavailable) as err:
        module.setup("fit")
    message = str(err.value)
    assert "\n" not in message and "model.init_args.optimizer" in message and "bitsandbytes" in message
    with pytest.raises(ValueError, match="model.init_args.optimizer: 'sgd'"):
        Stage1Module(optimizer="sgd")
    with pytest.raises(ValueError, match="model.init_args.snr_gamma"):
        Stage1Module(snr_gamma=0.0)


def test_adamw_is_foreach_on_the_cpu():
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer("adamw", params, 1e-3, 0.0, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"] is True


class FusedStage1(Stage1Module):
    """Stage 1 with the optimizer a CUDA device gets (fused AdamW, which the CPU also has), recording
    the trainable gradients' norm before and after clipping."""

    norms: list[tuple[float, float]]

    def configure_optimizers(self):
        self.norms = []
        return torch.optim.AdamW([p for p in self.trainable.values()], lr=1e-4, fused=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        norm = lambda: float(torch.linalg.vector_norm(  # noqa: E731
            torch.stack([p.grad.double().norm() for p in self.trainable.values() if p.grad is not None])))
        before = norm()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms.append((before, norm()))


def test_clipping_with_a_fused_adamw_under_bf16_mixed(shard_dirs, tmp_path):
    # Lightning's mixed-precision plugin alone raises here ("does not allow for gradient clipping").
    module = FusedStage1(preset="tiny", tokenizer_dir=str(tmp_path / "tok"))
    data = ShardDataModule(
        train_shards=[str(shard_dirs["train"])], val_shards=[str(shard_dirs["val"])], batch_size=2, num_workers=0,
        batches_per_epoch=1, shuffle_buffer=1, sample=SampleConfig(resolution=64, clip_size=32, ref_size=64),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=1e-3, max_steps=1,
                        logger=False, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    ((before, after),) = module.norms
    assert before > 1e-2 and after == pytest.approx(1e-3, rel=1e-3)
