"""`anystory generate` (an exported checkpoint -> image [+ routing-map picture]) and
`anystory inspect` (parameter counts of a preset, built on the meta device)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image


def _subject(value: str) -> tuple[Path, Path | None]:
    parts = value.split(",")
    if len(parts) > 2 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--subject takes REF or REF,MASK, got {value!r}")
    return Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None


def _open_subject(ref: Path, mask: Path | None) -> tuple[Image.Image, Image.Image | None]:
    for path in (ref, mask):
        if path is not None and not path.is_file():
            raise SystemExit(f"error: subject file {path} does not exist")
    image = Image.open(ref)
    image.load()
    mask_image = Image.open(mask) if mask is not None else None
    if mask_image is None and image.mode not in ("RGBA", "LA", "PA"):
        raise SystemExit(f"error: {ref} has no alpha channel: give its mask as --subject {ref},MASK")
    return image, mask_image


def generate(args: argparse.Namespace) -> int:
    from anystory.export import load_export
    from anystory.pipeline import AnyStoryPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    subjects = [_open_subject(ref, mask) for ref, mask in args.subject]
    model, components = load_export(args.checkpoint, device=device, dtype=dtype)
    pipe = AnyStoryPipeline(model, components)
    result = pipe(
        args.prompt,
        subjects,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height,
        width=args.width,
        seed=args.seed,
        eta=args.eta,
        gamma=args.gamma,
        router=not args.no_router,
        record_routing=args.routing_maps is not None,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(args.out)
    print(f"wrote {args.out}")
    if args.routing_maps is not None:
        args.routing_maps.parent.mkdir(parents=True, exist_ok=True)
        result.routing_picture().save(args.routing_maps)
        print(f"wrote {args.routing_maps}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from anystory.inspect_model import inspect_preset
    from anystory.presets import get_preset

    print(json.dumps(inspect_preset(get_preset(args.preset)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anystory", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image with an exported AnyStory checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True, help="export directory (anystory.json + .safetensors)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--subject", type=_subject, action="append", required=True,
                     help="REF[,MASK]; repeat per subject. Without MASK, REF's alpha channel is the mask")
    gen.add_argument("--out", type=Path, required=True, help="output PNG")
    gen.add_argument("--routing-maps", type=Path, default=None, help="also write the routing-map picture here")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--cfg", type=float, default=7.5)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--eta", type=float, default=None, help="strength of the routed CLIP subject attention")
    gen.add_argument("--gamma", type=float, default=None, help="logit bias of the reference tokens")
    gen.add_argument("--no-router", action="store_true", help="every subject everywhere (stage-1 behaviour)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.set_defaults(func=generate)

    ins = sub.add_parser("inspect", help="parameter counts of a preset (meta device, no weights)")
    ins.add_argument("--preset", default="sdxl", choices=["tiny", "sdxl"])
    ins.set_defaults(func=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
