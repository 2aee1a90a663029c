"""Training cost of AnyStory at SDXL shapes, in random weights (nothing is downloaded):

(a) one stage-1 training step (CLIP + QFormers + ReferenceNet + routed UNet with the router off,
    MSE, backward, AdamW on the stage-1 parameters) against one full fine-tuning step of the plain
    SDXL UNet (forward, MSE, backward, AdamW on all its parameters), the familiar reference cost;
(b) the simplified ReferenceNet forward against the full UNet forward at batch 1 and the
    reference latent size (the paper's Table 1: 53.2 vs 62.0 ms on an A100 at 64x64).

Both training sides use bf16 autocast with fp32 trainable weights, and gradient checkpointing on
the UNet and the ReferenceNet. AnyStory's frozen parts (UNet, CLIP) hold bf16 weights. The VAE and
text encoders are left out of both sides: latents and text embeddings are random tensors, as if
precomputed. Peak memory is torch.cuda.max_memory_allocated.

    python benchmarks/gpu_sdxl.py                      # sdxl, cuda, bf16, 1024 px
    python benchmarks/gpu_sdxl.py --device cpu --preset tiny --resolution 64 --dtype float32 --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from dispatch import DispatchCount, count_dispatch
from machine import describe_machine

from anystory.components import build_random
from anystory.config import AnyStoryConfig
from anystory.model import AnyStoryModel, Subjects
from anystory.presets import get_preset
from anystory.referencenet import ReferenceNet
from training.optim import adamw

# No float16: a fair fp16 training step would also need a GradScaler.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT_TOKENS = 77
GIB = 2**30


@dataclass
class Measurement:
    ms: list[float] = field(default_factory=list)
    peak: int = 0  # bytes, max over the timed calls (CUDA only)
    resident: int = 0  # bytes allocated before the first timed call (CUDA only)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int,
               repeats: int) -> dict[str, Measurement]:
    """Warm-up rounds, then timed rounds; within a round every step runs once, in an order rotated
    from round to round. Peak memory is reset before each call and read after it."""
    names = list(steps)
    results = {name: Measurement() for name in names}
    cuda = device.type == "cuda"
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)  # clocks are read only when the GPU queue is empty
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                allocated = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            elapsed = (time.perf_counter() - start) * 1e3
            if round_index < warmup:
                continue
            result = results[name]
            result.ms.append(elapsed)
            if cuda:
                result.peak = max(result.peak, torch.cuda.max_memory_allocated(device))
                result.resident = result.resident or allocated
    return results


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@dataclass
class Batch:
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor]


def make_batch(cfg: AnyStoryConfig, unet: UNet2DConditionModel, batch: int, resolution: int,
               device: torch.device, generator: torch.Generator) -> Batch:
    side = resolution // cfg.vae_scale_factor
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    return Batch(
        noisy=randn(batch, unet.config.in_channels, side, side),
        noise=randn(batch, unet.config.in_channels, side, side),
        timesteps=torch.randint(0, 1000, (batch,), generator=generator).to(device),
        text=randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim),
        added={"text_embeds": randn(batch, pooled),
               "time_ids": torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                                        dtype=torch.float32, device=device).expand(batch, 6)},
    )


def make_subjects(cfg: AnyStoryConfig, batch: int, ref_size: int, device: torch.device,
                  generator: torch.Generator) -> Subjects:
    """One subject per sample (stage 1)."""
    side, clip = ref_size // cfg.vae_scale_factor, cfg.clip_image_size
    mask = torch.zeros(batch, 1, 1, side, side)
    mask[..., side // 8 : side - side // 8, side // 4 : side - side // 4] = 1.0
    return Subjects(
        clip_pixels=torch.randn(batch, 1, 3, clip, clip, generator=generator).to(device),
        ref_latents=torch.randn(batch, 1, 4, side, side, generator=generator).to(device),
        ref_masks=mask.to(device),
        valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
        all_valid=True,  # the training module settles it on the host
    )


def count(params) -> int:
    return sum(p.numel() for p in params)


def bench_forward(cfg: AnyStoryConfig, unet: UNet2DConditionModel, args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> list[str]:
    """(b): full UNet vs simplified ReferenceNet forward, weights in `dtype`, batch 1, interleaved."""
    full = copy.deepcopy(unet).eval()
    if dtype != torch.float32:
        full.to(dtype)
    # Built in float32 (it is trained in stage 1); (b) compares forwards in one dtype.
    referencenet = ReferenceNet(full, args.ref_size).to(dtype).eval()
    side = args.ref_size // cfg.vae_scale_factor
    inputs = make_batch(cfg, full, 1, args.ref_size, device, generator)
    latents, text = inputs.noisy.to(dtype), inputs.text.to(dtype)
    added = {k: v.to(dtype) for k, v in inputs.added.items()}
    mask = torch.ones(1, 1, side, side, device=device, dtype=dtype)
    steps = {
        "full": lambda: full(latents, torch.zeros(1, device=device), encoder_hidden_states=text,
                             added_cond_kwargs=added),
        "simplified": lambda: referencenet(latents, mask),
    }
    with torch.no_grad():
        results = run_rounds(steps, device, args.warmup, args.repeats)
    ratios = [s / f for s, f in zip(results["simplified"].ms, results["full"].ms, strict=True)]
    params = {"full": count(full.parameters()), "simplified": count(referencenet.parameters())}
    labels = {"full": "full UNet (with cross-attention)", "simplified": "simplified ReferenceNet (no cross-att.)"}
    lines = [f"(b) forward, torch.no_grad, {args.dtype} weights, batch 1, latent {side}x{side} "
             f"({args.ref_size} px reference), {TEXT_TOKENS} text tokens for the full UNet; interleaved"]
    lines += [format_row(labels[name], results[name], f"{params[name] / 1e6:,.1f} M params", device)
              for name in ("full", "simplified")]
    lines.append(f"ratio (b) simplified ReferenceNet / full UNet forward: {statistics.median(ratios):.3f}x "
                 "(median of per-round ratios; paper Table 1, A100: 53.2 / 62.0 ms = 0.858x, "
                 "2.02 / 2.57 B params)")
    return lines


def bench_plain_training(unet: UNet2DConditionModel, args: argparse.Namespace, device: torch.device,
                         dtype: torch.dtype, batch: Batch) -> tuple[Measurement, int, DispatchCount]:
    """(a), baseline side: full fine-tuning of the plain UNet (all parameters, fp32 master weights)."""
    unet.requires_grad_(True).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    optimizer = adamw(params, args.lr, 1e-2, device)

    def forward_backward() -> None:
        with autocast(device, dtype):
            pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=batch.text,
                        added_cond_kwargs=batch.added).sample
        F.mse_loss(pred.float(), batch.noise).backward()

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = run_rounds({"plain": step}, device, args.warmup, args.repeats)["plain"]
    ops = count_dispatch(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    unet.requires_grad_(False).eval()
    return result, count(params), ops


def bench_stage1_training(cfg: AnyStoryConfig, unet: UNet2DConditionModel, image_encoder: torch.nn.Module,
                          args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batch: Batch,
                          subjects: Subjects) -> tuple[Measurement, int, str, DispatchCount]:
    """(a), AnyStory side: model.set_stage(1), router off, fp32 trainable weights, bf16 frozen ones."""
    model = AnyStoryModel(cfg, unet, image_encoder)
    if dtype != torch.float32:
        # The frozen UNet and CLIP in bf16; the adapters are registered inside the UNet as its
        # attention processors, so they are put back to fp32 with the other trainable parts.
        model.unet.to(dtype)
        model.image_encoder.to(dtype)
        model.adapters.float()
    params = list(model.set_stage(1).values())
    model.train()
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.referencenet.unet.enable_gradient_checkpointing()
    optimizer = adamw(params, args.lr, 1e-2, device)

    def forward_backward() -> None:
        with autocast(device, dtype):
            refs = model.encode_references(subjects)
            pred = model(batch.noisy, batch.timesteps, batch.text, batch.added, refs=refs, router=False).noise_pred
        F.mse_loss(pred.float(), batch.noise).backward()

    # Untimed check that the measured step trains what stage 1 trains (checkpointing included).
    forward_backward()
    with_grad = sum(p.grad is not None for p in params)
    optimizer.zero_grad(set_to_none=True)
    coverage = f"{with_grad} / {len(params)} stage-1 parameter tensors received a gradient"

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = run_rounds({"stage1": step}, device, args.warmup, args.repeats)["stage1"]
    ops = count_dispatch(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    return result, count(params), coverage, ops


def format_row(label: str, result: Measurement, extra: str, device: torch.device) -> str:
    memory = (f"peak {result.peak / GIB:7.2f} GiB (resident before the call {result.resident / GIB:6.2f} GiB)"
              if device.type == "cuda" else "peak memory n/a on CPU")
    return f"  {label:<42} {result.median_ms:10.1f} ms   {memory}   {extra}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "sdxl"], default="sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="autocast dtype of training and weight dtype of (b); float32 turns autocast off")
    parser.add_argument("--resolution", type=int, default=None, help="target px (default: preset's, 1024)")
    parser.add_argument("--ref-size", type=int, default=None, help="reference px (default: preset's, 512)")
    parser.add_argument("--batch", type=int, default=1, help="training batch (per device)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed rounds: a smoke run")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = get_preset(args.preset)
    args.resolution = args.resolution or cfg.resolution
    args.ref_size = args.ref_size or cfg.ref_size
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        comp = build_random(cfg, tokenizer_dir, seed=args.seed, device=device)
    unet, image_encoder = comp.unet, comp.image_encoder
    del comp  # the VAE and text encoders are not part of either side
    release(device)

    print("AnyStory training cost at SDXL shapes (random weights)")
    print(f"machine: {describe_machine(device)}; dtype {args.dtype}")
    print(f"preset {args.preset}: {len(unet.attn_processors) // 2} transformer blocks, block_out_channels "
          f"{cfg.unet['block_out_channels']}")
    # Each phase frees what it built when it returns; release() hands the memory back.
    lines = bench_forward(cfg, unet, args, device, dtype, generator)
    release(device)

    batch = make_batch(cfg, unet, args.batch, args.resolution, device, generator)
    subjects = make_subjects(cfg, args.batch, args.ref_size, device, generator)
    plain, plain_params, plain_ops = bench_plain_training(unet, args, device, dtype, batch)
    release(device)
    # The same UNet (weights after the baseline's few AdamW steps), now patched by AnyStory.
    stage1, stage1_params, coverage, stage1_ops = bench_stage1_training(cfg, unet, image_encoder, args, device, dtype,
                                                            batch, subjects)

    side, ref_side = args.resolution // cfg.vae_scale_factor, args.ref_size // cfg.vae_scale_factor
    checkpointing = "on" if args.gradient_checkpointing else "off"
    precision = f"{args.dtype} autocast" if dtype != torch.float32 else "float32, no autocast"
    print(f"(a) training step, batch {args.batch}, {args.resolution} px (latent {side}x{side}), reference "
          f"{args.ref_size} px (latent {ref_side}x{ref_side}), {precision}, gradient checkpointing "
          f"{checkpointing}, AdamW; {args.warmup} warm-up + {args.repeats} timed steps per side, median")
    print("    the sides run one after the other, each alone in memory (their optimizer states do not fit "
          "together on one GPU, and each peak is its own)")
    print(format_row("plain UNet, full fine-tuning", plain, f"{plain_params / 1e6:,.1f} M trainable", device))
    print(format_row("AnyStory stage 1 (router off)", stage1, f"{stage1_params / 1e6:,.1f} M trainable", device))
    print(f"    stage 1 = CLIP (frozen, no grad) + QFormers + ReferenceNet + routed UNet (frozen) forward, "
          f"MSE, backward, AdamW; {coverage}")
    print(f"ratio (a) AnyStory stage-1 step / plain UNet full fine-tuning step: "
          f"{stage1.median_ms / plain.median_ms:.3f}x")
    print("    forward + backward of one step counted with a TorchDispatchMode: aten ops / kernel-launching ops / "
          "host syncs (the optimizer is left out: off CUDA its step counters are host scalars, whose reads "
          "count here without being device syncs; on CUDA fused AdamW keeps them on the device)")
    for name, ops in (("plain UNet, full fine-tuning", plain_ops), ("AnyStory stage 1", stage1_ops)):
        print(f"    {name:<32} {ops.total:>8} / {ops.kernels:>8} / {ops.syncs:>4}")
    print(f"ratio (a) aten ops per step, stage 1 / plain: {stage1_ops.total / plain_ops.total:.3f}x; "
          f"host syncs per stage-1 step: {stage1_ops.syncs}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
