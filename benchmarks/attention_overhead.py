"""Cost of AnyStory's routed attention per denoising step: a UNet forward with AnyStory (N subjects,
router on, reference attention on, eta = 1) over the plain UNet forward, measured side by side.

The plain side is a deep copy of the same UNet taken before AnyStory patches it, so it keeps
diffusers' default `AttnProcessor2_0`. The ReferenceNet and CLIP encoders run once per generation
call, not per step, so they are computed before the timed region.

The default `mid` preset is SDXL with every width divided by 4 and the image side halved, with all
70 transformer blocks. Per-token work (n d^2) and token mixing (n^2 d) then both shrink 64x;
fixed-length contexts (text tokens, subject tokens) shrink with the width, so that every term keeps
its SDXL share of the FLOPs and the ratio on a CPU is a fair proxy. `--preset sdxl --device cuda
--dtype bfloat16 --resolution 1024` measures the paper's shapes. On a CPU shared with other jobs,
`--threads 1 --clock cpu` is the stable choice: two OpenMP threads wait on each other whenever one
is descheduled, which inflates and scatters wall times.

    python benchmarks/attention_overhead.py --threads 1 --clock cpu   # mid preset, ~1-2 min on a CPU
    python benchmarks/attention_overhead.py --quick         # tiny preset, seconds (smoke test)
    python benchmarks/attention_overhead.py --preset sdxl --device cuda --dtype bfloat16 --resolution 1024
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from dispatch import DispatchCount, count_dispatch
from machine import describe_machine

from anystory.components import build_random
from anystory.config import AnyStoryConfig, QFormerConfig, RouterConfig
from anystory.context import ReferenceEncoding
from anystory.model import AnyStoryModel, Subjects
from anystory.presets import get_preset

SDXL_TEXT_TOKENS = 77
MID_SCALE = 4  # the mid preset's width divisor (the image side is halved: sqrt(4))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mid_preset() -> AnyStoryConfig:
    """The `sdxl` preset with every width / 4, resolution and reference size / 2."""
    scale = MID_SCALE
    sdxl, tiny = get_preset("sdxl"), get_preset("tiny")
    unet = dict(sdxl.unet)
    time_dim, pooled = unet["addition_time_embed_dim"] // scale, 1280 // scale
    unet.update(
        sample_size=unet["sample_size"] // 2,
        block_out_channels=[c // scale for c in unet["block_out_channels"]],  # 80, 160, 320
        attention_head_dim=[2, 4, 8],  # head counts: head width 40 at every level
        cross_attention_dim=unet["cross_attention_dim"] // scale,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
        norm_num_groups=16,  # 80 channels are not divisible by SDXL's 32 groups
    )
    cross, clip_width = unet["cross_attention_dim"], 1280 // scale
    qformer = dict(input_dim=clip_width, output_dim=cross, width=clip_width, heads=clip_width // 64)
    return dataclasses.replace(
        sdxl,
        preset="mid",
        unet=unet,
        # The VAE and text encoders are not run here; the VAE keeps SDXL's 8x factor.
        vae=dict(sdxl.vae, block_out_channels=[32, 32, 64, 64]),
        text_encoder=tiny.text_encoder,
        text_encoder_2=tiny.text_encoder_2,
        # CLIP runs outside the timed region: a shallow ViT with ViT-H/14's 257 tokens is enough.
        image_encoder=dict(sdxl.image_encoder, hidden_size=clip_width, intermediate_size=4 * clip_width,
                           num_hidden_layers=4, num_attention_heads=clip_width // 64, projection_dim=256),
        subject_qformer=QFormerConfig(num_queries=64 // scale, **qformer),
        routing_qformer=QFormerConfig(num_queries=1, **qformer),
        router=RouterConfig(routing_dim=cross, width=256 // scale, heads=1),
        ref_size=sdxl.ref_size // 2,
        resolution=sdxl.resolution // 2,
    )


def load_preset(name: str) -> AnyStoryConfig:
    return mid_preset() if name == "mid" else get_preset(name)


@dataclass
class UNetInputs:
    latents: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor]


def make_inputs(cfg: AnyStoryConfig, unet: UNet2DConditionModel, resolution: int, text_tokens: int,
                device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> UNetInputs:
    side = resolution // cfg.vae_scale_factor
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return UNetInputs(
        latents=randn(1, unet.config.in_channels, side, side),
        timesteps=torch.tensor([500], device=device),
        text=randn(1, text_tokens, unet.config.cross_attention_dim),
        added={"text_embeds": randn(1, pooled),
               "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                        device=device, dtype=dtype)},
    )


def make_subjects(cfg: AnyStoryConfig, n: int, ref_size: int, device: torch.device, dtype: torch.dtype,
                  generator: torch.Generator) -> Subjects:
    side, clip = ref_size // cfg.vae_scale_factor, cfg.clip_image_size
    mask = torch.zeros(1, n, 1, side, side)
    mask[..., side // 8 : side - side // 8, side // 4 : side - side // 4] = 1.0  # a centred subject
    return Subjects(
        clip_pixels=torch.randn(1, n, 3, clip, clip, generator=generator).to(device=device, dtype=dtype),
        ref_latents=torch.randn(1, n, 4, side, side, generator=generator).to(device=device, dtype=dtype),
        ref_masks=mask.to(device=device, dtype=dtype),
        valid=torch.ones(1, n, dtype=torch.bool, device=device),
        all_valid=True,  # known on the host, as in AnyStoryPipeline
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of one call. "wall": elapsed time, GPU queue drained before each clock read.
    "cpu": this process's CPU time, which time-slicing by other jobs does not inflate (with one
    thread; with several, threads that spin-wait for a descheduled peer count too)."""
    read = time.process_time if clock == "cpu" else time.perf_counter
    synchronize(device)  # GPU work is asynchronous: the clock is read only when the queue is empty
    start = read()
    fn()
    synchronize(device)
    return (read() - start) * 1e3


def count_fused_plain(plain: UNet2DConditionModel, inputs: UNetInputs) -> DispatchCount:
    """Ops of a plain step with diffusers' own q/k/v fusion (on a copy, freed on return)."""
    fused = copy.deepcopy(plain)
    fused.fuse_qkv_projections()

    def step() -> torch.Tensor:
        return fused(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.text,
                     added_cond_kwargs=inputs.added).sample

    step()
    return count_dispatch(step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "mid", "sdxl"], default=None,
                        help="model shapes (default mid; tiny with --quick)")
    parser.add_argument("--resolution", type=int, default=None, help="generated image side in px "
                        "(default: the preset's: mid 512, sdxl 1024, tiny 64)")
    parser.add_argument("--ref-size", type=int, default=None, help="reference side in px (default: preset's)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text context length (default 77, scaled with the width for mid)")
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 4], help="values of N")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or process CPU time (CPU only; use with --threads 1 on a machine "
                             "shared with other jobs)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 1 + 3 rounds: a smoke run")
    args = parser.parse_args(argv)
    quick = args.quick
    args.preset = args.preset or ("tiny" if quick else "mid")
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if quick else 7)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        parser.error("--clock cpu measures host CPU time: only for --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_preset(args.preset)
    resolution = args.resolution or cfg.resolution
    ref_size = args.ref_size or cfg.ref_size
    text_tokens = args.text_tokens or (SDXL_TEXT_TOKENS // MID_SCALE if args.preset == "mid" else SDXL_TEXT_TOKENS)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        comp = build_random(cfg, tokenizer_dir, seed=args.seed, device=device)
    if dtype != torch.float32:
        comp.unet.to(dtype)
        comp.image_encoder.to(dtype)
    unet = comp.unet.eval()
    plain = copy.deepcopy(unet)  # before AnyStory patches it: diffusers' default processors
    model = AnyStoryModel(cfg, unet, comp.image_encoder).to(dtype).eval()  # (the QFormers are new)
    del comp  # the VAE and text encoders play no part here
    inputs = make_inputs(cfg, plain, resolution, text_tokens, device, dtype, generator)

    def run_plain() -> torch.Tensor:
        return plain(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.text,
                     added_cond_kwargs=inputs.added).sample

    def run_anystory(refs: ReferenceEncoding) -> torch.Tensor:
        return model(inputs.latents, inputs.timesteps, inputs.text, inputs.added, refs=refs,
                     router=True, eta=1.0, reference_attention=True).noise_pred

    with torch.no_grad():
        # Per generation call, not per step: outside the timed region.
        refs = {n: model.encode_references(make_subjects(cfg, n, ref_size, device, dtype, generator))
                for n in args.subjects}
        # The baseline is the same network: the patched UNet without an AnyStory context
        # computes plain attention and must agree with the untouched copy.
        baseline_diff = (run_plain() - unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.text,
                                            added_cond_kwargs=inputs.added).sample).abs().max().item()
        def cached_step(refs: ReferenceEncoding, router: bool = True) -> Callable[[], torch.Tensor]:
            # A denoising step inside a generation call: the per-call values (reference and text K/V,
            # the routers' per-route factors) were computed at the first step and are reused, as
            # AnyStoryPipeline does. The first call here is that first step.
            ctx = model.context(refs, inputs.latents.shape[-2:], router=router, sampling="argmax", eta=1.0,
                                cache_reference_kv=True)
            step = lambda: unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.text,  # noqa: E731
                                added_cond_kwargs=inputs.added, cross_attention_kwargs={"anystory": ctx}).sample
            step()
            return step

        # Device-independent proxies of a host-bound GPU step: aten ops and host syncs per step.
        run_plain()
        counts = {"plain": count_dispatch(run_plain)}
        # Also against plain SDXL with diffusers' own q/k/v fusion, since AnyStory fuses the frozen
        # self-attention projections within a call: the honest share of the gain.
        counts["plain, fused q/k/v"] = count_fused_plain(plain, inputs)
        counts.update({f"N={n} step": count_dispatch(cached_step(refs[n])) for n in args.subjects})
        counts.update({f"N={n} step, router off": count_dispatch(cached_step(refs[n], router=False))
                       for n in args.subjects})

        variants: dict[str, Callable[[], torch.Tensor]] = {"plain": run_plain}
        variants.update({f"N={n}": (lambda r=refs[n]: run_anystory(r)) for n in args.subjects})
        variants.update({f"N={n} cached": cached_step(refs[n]) for n in args.subjects})
        names = list(variants)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.warmup + args.repeats):
            # Interleaved, with the order rotated each round, so drift and other jobs on the
            # machine fall on every variant alike.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = time_ms(variants[name], device, args.clock)
                if round_index >= args.warmup:
                    times[name].append(elapsed)

    side = resolution // cfg.vae_scale_factor
    ref_side = ref_size // cfg.vae_scale_factor
    print("AnyStory attention overhead: UNet forward with AnyStory / plain UNet forward")
    print(f"machine: {describe_machine(device)}; dtype {args.dtype}")
    print(f"preset {args.preset}: block_out_channels {cfg.unet['block_out_channels']}, transformer layers "
          f"{cfg.unet['transformer_layers_per_block']}, {len(model.block_names)} transformer blocks, "
          f"cross-attention width {cfg.cross_attention_dim}")
    print(f"shapes: batch 1, image {resolution} px -> latent {side}x{side}; references {ref_size} px -> "
          f"latent {ref_side}x{ref_side}; {text_tokens} text tokens, {cfg.subject_qformer.num_queries} "
          f"subject tokens per route")
    plain_processors = ", ".join(sorted({type(p).__name__ for p in plain.attn_processors.values()}))
    print("anystory: router on (argmax), reference attention on, eta = 1, gamma = 0; plain: a copy of the "
          f"same UNet with diffusers' {plain_processors} (max |diff| to the patched UNet without context: "
          f"{baseline_diff:.2e})")
    print("ReferenceNet + CLIP + QFormers: computed once before the timed region (per call, not per step)")
    print(f"timing: {args.clock} clock, torch.no_grad, {args.warmup} warm-up + {args.repeats} timed rounds, "
          "variants interleaved in rotating order; ms = median; ratio = median over rounds of "
          "anystory / plain of the same round")
    print("rows: 'forward' = a single routed forward (training); 'step' = a denoising step of a generation "
          "call, reference K/V cached from its first step")
    print(f"{'N':>3} {'kind':>8} {'plain ms':>10} {'anystory ms':>12} {'ratio':>8}")
    plain_ms = statistics.median(times["plain"])
    for n in args.subjects:
        for kind, name in (("forward", f"N={n}"), ("step", f"N={n} cached")):
            ratios = [a / p for a, p in zip(times[name], times["plain"], strict=True)]
            print(f"{n:>3} {kind:>8} {plain_ms:>10.1f} {statistics.median(times[name]):>12.1f} "
                  f"{statistics.median(ratios):>7.3f}x")
    print("target: <= 1.25x for N = 2 at SDXL shapes")
    plain_count = counts["plain"]
    print("per denoising step, counted with a TorchDispatchMode (the same on any device): aten ops, ops that "
          "launch a kernel (views excluded), host synchronisations")
    print(f"{'variant':>22} {'aten ops':>9} {'ratio':>7} {'kernels':>8} {'ratio':>7} {'syncs':>6}")
    for name, count in counts.items():
        print(f"{name:>22} {count.total:>9} {count.total / plain_count.total:>6.2f}x {count.kernels:>8} "
              f"{count.kernels / plain_count.kernels:>6.2f}x {count.syncs:>6}")
    print("targets: aten ops <= 1.3x plain at N = 2; 0 host syncs")


if __name__ == "__main__":
    main()
