"""`anystory generate` (an exported checkpoint -> image [+ routing-map picture]) and
`anystory inspect` (parameter counts of a preset, built on the meta device).

A user's mistake is one line on stderr that names the argument or file, and exit code 2. `generate`
checks its arguments, outputs, export and subjects before it imports torch or loads a model, and
writes its outputs only once all of them are rendered, each atomically."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

PROG = "anystory"


class UserError(Exception):
    """A mistake in the command line or in a file it names; the message is shown as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors without the usage block: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _subject(value: str) -> tuple[Path, Path | None]:
    parts = value.split(",")
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise argparse.ArgumentTypeError(f"takes REF or REF,MASK, got {value!r}")
    return Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _guidance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 to 1: no guidance), got {value}")
    return number


# ---- checks that run before any model loads -------------------------------------------------


def check_output(path: Path, flag: str) -> None:
    """The output can be written: an image format PIL knows, not a folder, and the nearest
    existing parent folder accepts a new file (tried for real: permissions, read-only mounts)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{flag} {path}: unknown image format {path.suffix or '(no extension)'!r} (use .png or .jpg)")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({err.strerror})") from None


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{what}: {path} is not a readable image ({err})") from None
    return image


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Equal aspect ratio up to one pixel of rounding at the smaller size."""
    (aw, ah), (bw, bh) = sorted((a, b))
    return abs(ah * bw / aw - bh) <= bw / aw


def open_subjects(specs: list[tuple[Path, Path | None]]) -> list[tuple[Image.Image, Image.Image | None]]:
    """Each reference and its mask opened as images. A mask of another size is resized to its
    reference (as the pipeline does) only when the aspect ratio is the same, with a note; a mask of
    another shape belongs to another picture and is an error."""
    subjects = []
    for ref, mask in specs:
        flag = f"--subject {ref}" + (f",{mask}" if mask else "")
        image = _open_image(ref, flag)
        mask_image = _open_image(mask, flag) if mask is not None else None
        if mask_image is not None and mask_image.size != image.size:
            if not _same_aspect(mask_image.size, image.size):
                raise UserError(f"{flag}: mask is {mask_image.width}x{mask_image.height}, reference is "
                                f"{image.width}x{image.height} (not the same aspect ratio)")
            print(f"note: {flag}: mask {mask_image.width}x{mask_image.height} is resized to the reference's "
                  f"{image.width}x{image.height}", file=sys.stderr)
        subjects.append((image, mask_image))
    return subjects


def check_masks(specs: list[tuple[Path, Path | None]], subjects: list[tuple[Image.Image, Image.Image | None]]) -> None:
    """Every subject has a non-empty mask, by the rule the pipeline applies (preprocess.split_mask)."""
    from anystory.preprocess import split_mask

    for (ref, mask), (image, mask_image) in zip(specs, subjects, strict=True):
        try:
            split_mask(image, mask_image)
        except ValueError as err:
            raise UserError(f"--subject {ref}" + (f",{mask}" if mask else "") + f": {err}") from None


def check_size(value: int | None, flag: str, multiple: int) -> None:
    if value is not None and value % multiple:
        raise UserError(f"{flag} {value}: must be a multiple of {multiple} for this model")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the command line, its outputs and its export that can fail, before any
    model loads (and before torch is imported)."""
    from anystory.export_format import ExportError, validate_export

    if args.routing_maps is not None and args.no_router:
        raise UserError("--routing-maps: draws the router's maps, which --no-router turns off")
    check_output(args.out, "--out")
    if args.routing_maps is not None:
        check_output(args.routing_maps, "--routing-maps")
        if args.routing_maps.resolve() == args.out.resolve():
            raise UserError(f"--routing-maps {args.routing_maps}: is the same file as --out")
    try:
        config, _ = validate_export(args.checkpoint)
    except ExportError as err:
        raise UserError(f"--checkpoint: {err}") from None
    # The latent is halved once per UNet down block; the routing maps need whole sizes at every level.
    multiple = config.vae_scale_factor * 2 ** (len(config.unet["down_block_types"]) - 1)
    check_size(args.height, "--height", multiple)
    check_size(args.width, "--width", multiple)


# ---- writing -------------------------------------------------------------------------------


def write_images(outputs: dict[Path, Image.Image]) -> None:
    """Encode every image first (a failure leaves nothing), then publish each atomically; if a
    later one fails, the earlier ones written by this call are removed again."""
    from anystory.atomic import write_atomic

    encoded = {}
    for path, image in outputs.items():
        buffer = io.BytesIO()
        image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()])
        encoded[path] = buffer.getvalue()
    created_dirs: list[Path] = []
    written: list[Path] = []
    try:
        for path, data in encoded.items():
            missing = [p for p in reversed(path.parents) if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            created_dirs += missing
            existed = path.exists()
            write_atomic(path, data)
            if not existed:
                written.append(path)
    except OSError as err:
        for path in written:
            path.unlink(missing_ok=True)
        for directory in reversed(created_dirs):
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise UserError(f"cannot write {err.filename}: {err.strerror}") from None
    for path in encoded:
        print(f"wrote {path}")


# ---- commands ------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> int:
    check_arguments(args)
    subjects = open_subjects(args.subject)
    if args.cfg <= 1:
        print(f"note: --cfg {args.cfg} <= 1 runs without classifier-free guidance", file=sys.stderr)

    import torch

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device}: not a device name (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_masks(args.subject, subjects)

    from anystory.export import ExportMismatchError, load_export
    from anystory.pipeline import AnyStoryPipeline
    from anystory.visualize import cutout, routing_panel

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        model, components = load_export(args.checkpoint, device=device, dtype=dtype)
    except (ExportMismatchError, FileNotFoundError) as err:
        raise UserError(f"--checkpoint: {err}") from None
    pipe = AnyStoryPipeline(model, components)
    pipe.sdxl.set_progress_bar_config(disable=args.quiet, desc="denoising")
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
    outputs = {args.out: result.images[0]}
    if args.routing_maps is not None:
        steps = [(timestep, maps) for _, timestep, maps in result.routing]
        references = [cutout(image, mask) for image, mask in subjects]
        outputs[args.routing_maps] = routing_panel(result.images[0], steps, references=references)
    write_images(outputs)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from anystory.inspect_model import inspect_preset
    from anystory.presets import get_preset

    print(json.dumps(inspect_preset(get_preset(args.preset)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image with an exported AnyStory checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True, help="export directory (anystory.json + .safetensors)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--subject", type=_subject, action="append", required=True,
                     help="REF[,MASK]; repeat per subject. Without MASK, REF's alpha channel is the mask. A MASK "
                          "of another size than REF is resized to it when the aspect ratio is the same, else refused")
    gen.add_argument("--out", type=Path, required=True, help="output image (.png, .jpg, ...)")
    gen.add_argument("--routing-maps", type=Path, default=None,
                     help="also write the routing-map picture here (needs the router)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (at least 1)")
    gen.add_argument("--cfg", type=_guidance, default=7.5,
                     help="classifier-free guidance scale, >= 0; at most 1 means unguided")
    gen.add_argument("--height", type=_positive_int, default=None)
    gen.add_argument("--width", type=_positive_int, default=None)
    gen.add_argument("--eta", type=float, default=None, help="strength of the routed CLIP subject attention")
    gen.add_argument("--gamma", type=float, default=None, help="logit bias of the reference tokens")
    gen.add_argument("--no-router", action="store_true", help="every subject everywhere (stage-1 behaviour)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=generate)

    ins = sub.add_parser("inspect", help="parameter counts of a preset (meta device, no weights)")
    ins.add_argument("--preset", default="sdxl", choices=["tiny", "sdxl"])
    ins.set_defaults(func=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        # Messages built from other errors may span lines (a list of mismatched keys): keep one.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
