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
from training.diffusion import diffusion_loss, diffusion_step, loss_weights, training_noise
from training.module import Stage1Module
from training.optim import OptimizerUnavailable, build_optimizer, lr_schedule


def _lrs(decay: str, warmup_steps: int, total_steps: int, steps: int, lr: float = 0.1) -> list[float]:
    """The lr of each of the first `steps` optimizer steps, as Lightning steps the schedule (once per step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = lr_schedule(optimizer, decay, warmup_steps, total_steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / lr)
        optimizer.step()
        schedule.step()
    return out


def test_constant_schedule_warms_up_from_zero_then_holds():
    assert _lrs("constant", warmup_steps=4, total_steps=-1, steps=7) == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1])
    assert _lrs("constant", warmup_steps=0, total_steps=-1, steps=3) == [1.0, 1.0, 1.0]  # no warm-up: full lr at once


def test_cosine_schedule_decays_to_zero_at_max_steps():
    f = _lrs("cosine", warmup_steps=10, total_steps=110, steps=111)
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    after = f[10:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never rises after warm-up
    assert f[60] == pytest.approx(0.5)  # half-way through the decay
    assert f[110] == pytest.approx(0.0, abs=1e-12)
    assert f[35] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_schedule_errors_name_the_setting():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="lr_decay must be 'constant' or 'cosine', got 'linear'"):
        lr_schedule(optimizer, "linear", 0, 100)
    with pytest.raises(ValueError, match="lr_decay=cosine needs trainer.max_steps"):
        lr_schedule(optimizer, "cosine", 10, -1)  # no trainer.max_steps: a cosine has nowhere to end


def test_cosine_run_shorter_than_its_warmup_only_warms_up():
    assert _lrs("cosine", warmup_steps=10, total_steps=3, steps=3) == pytest.approx([0.0, 0.1, 0.2])


# ----- loss and step controls -----
def _alphas_cumprod_by_hand() -> np.ndarray:
    # SDXL's "scaled_linear" betas: linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_min_snr_weighting_changes_the_loss_as_defined():
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    timesteps = torch.tensor([0, 40, 300, 999])
    generator = torch.Generator().manual_seed(0)
    pred, noise = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(2))

    alpha_bar = _alphas_cumprod_by_hand()[timesteps.numpy()]
    snr = alpha_bar / (1.0 - alpha_bar)
    weights = np.minimum(snr, 5.0) / snr
    per_sample = ((pred - noise).double() ** 2).mean(dim=(1, 2, 3)).numpy()
    expected = float((weights * per_sample).mean())

    got = loss_weights(scheduler, timesteps, snr_gamma=5.0)
    assert got.numpy() == pytest.approx(weights, rel=1e-4)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # t=0 (SNR ~1000) is damped, t=999 (SNR < 5) is not
    loss = diffusion_loss(pred, noise, got)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(diffusion_loss(pred, noise)) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert float(loss) < float(diffusion_loss(pred, noise))


def test_diffusion_step_noises_at_the_timesteps_it_passes_on():
    # A predictor that inverts x_t = sqrt(a) x_0 + sqrt(1 - a) eps with hand-computed alphas gets loss 0;
    # one that predicts zeros gets the noise's mean square, each sample weighted by min-SNR if asked.
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    alpha_bar = torch.from_numpy(_alphas_cumprod_by_hand())
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {}

    def invert(noisy, t):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        seen["noise"] = ((noisy.double() - a.sqrt() * latents.double()) / (1 - a).sqrt()).float()
        seen["t"] = t
        return seen["noise"], "extra"

    loss, extra = diffusion_step(scheduler, latents, invert)
    assert extra == "extra" and float(loss) == pytest.approx(0.0, abs=1e-8)
    assert seen["t"].unique().numel() > 1  # one timestep per sample
    torch.manual_seed(3)
    loss, _ = diffusion_step(scheduler, latents, lambda noisy, t: (torch.zeros_like(noisy), None), snr_gamma=5.0)
    torch.manual_seed(3)
    diffusion_step(scheduler, latents, invert)  # the same draws: the noise and timesteps used above
    a = alpha_bar[seen["t"]].numpy()
    weights = np.minimum(a / (1 - a), 5.0) / (a / (1 - a))
    expected = (weights * (seen["noise"].double() ** 2).mean(dim=(1, 2, 3)).numpy()).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    # Debiased estimation: 1 / sqrt(SNR) (SNR capped at 1000), alone and times min-SNR.
    debiased = 1 / np.sqrt(np.minimum(a / (1 - a), 1000.0))
    for gamma, want in ((None, debiased), (5.0, debiased * weights)):
        torch.manual_seed(3)
        loss, _ = diffusion_step(scheduler, latents, lambda noisy, t: (torch.zeros_like(noisy), None),
                                 snr_gamma=gamma, debiased=True)
        expected = (want * (seen["noise"].double() ** 2).mean(dim=(1, 2, 3)).numpy()).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-4)


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


# ----- checkpoints: AnyStory's tensors only, strictly checked -----
def _checkpoint_state(module: Stage1Module) -> dict[str, torch.Tensor]:
    checkpoint = {"state_dict": module.state_dict()}  # as Lightning gathers it, then hands it to the hook
    module.on_save_checkpoint(checkpoint)
    return checkpoint["state_dict"]


def test_checkpoint_holds_the_adapters_and_loads_them_strictly(tmp_path):
    module = Stage1Module(preset="tiny", tokenizer_dir=str(tmp_path / "tok"), seed=1)
    module.configure_model()
    full = module.state_dict()
    state = _checkpoint_state(module)
    adapters = module.model.adapter_state_dict()
    assert list(state) == [f"model.{k}" for k in adapters]
    assert any(k.startswith("model.unet.") for k in full) and len(state) < len(full)  # the base is dropped
    assert not any(k.startswith(("model.unet.", "vae.", "text_encoder")) or ".processor." in k for k in state)
    state = {k: v + 1.0 for k, v in state.items()}

    # Lightning's own loader (non-strict: strict_loading), on a module it builds without configure_model.
    hyper = {**dict(module.hparams), "seed": 2}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "pytorch-lightning_version": L.__version__},
               tmp_path / "a.ckpt")
    other = Stage1Module.load_from_checkpoint(tmp_path / "a.ckpt", map_location="cpu")
    loaded = other.model.adapter_state_dict()
    assert all(torch.equal(loaded[k], state[f"model.{k}"]) for k in adapters)

    key = next(iter(state))
    before = {k: v.clone() for k, v in loaded.items()}
    for broken, word in (({k: v for k, v in state.items() if k != key}, "missing"),
                         ({**state, "model.extra.weight": torch.zeros(1)}, "unexpected")):
        with pytest.raises(KeyError) as err:
            other.load_state_dict({k: v * 3 for k, v in broken.items()}, strict=other.strict_loading)
        message = err.value.args[0]
        assert "\n" not in message and word in message and (key if word == "missing" else "model.extra.weight") in message
        assert all(torch.equal(before[k], v) for k, v in other.model.adapter_state_dict().items())  # nothing copied
    with pytest.raises(ValueError, match=rf"{key}: checkpoint \(1,\) vs model"):
        other.load_state_dict({**state, key: torch.zeros(1)}, strict=other.strict_loading)


def test_training_timesteps_stay_in_the_configured_range():
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    latents = torch.zeros(256, 4, 2, 2)
    seen = {}

    def record(noisy, t):
        seen["t"] = t
        return torch.zeros_like(noisy), None

    diffusion_step(scheduler, latents, record, timesteps_range=(900, 950))
    assert int(seen["t"].min()) >= 900 and int(seen["t"].max()) < 950 and seen["t"].unique().numel() > 10
    diffusion_step(scheduler, latents, record, timesteps_range=(990, None))  # None: to the schedule's end
    assert set(seen["t"].tolist()) <= set(range(990, 1000)) and int(seen["t"].max()) >= 995
    with pytest.raises(ValueError, match="min_timestep=500 and max_timestep=400"):
        Stage1Module(min_timestep=500, max_timestep=400)
