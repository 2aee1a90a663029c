"""`python -m training.export --ckpt runs/.../last.ckpt --out artifacts/export`: a training
checkpoint -> the directory `anystory generate` loads (anystory.json + anystory.safetensors, and
the base under base/ when it exists nowhere else: random or toy-trained).

The checkpoint already holds every tensor AnyStory adds, so no base weights are read: the model is
built on the meta device only to check the checkpoint's keys and shapes (seconds, no memory, for
SDXL too). A toy base (`base_dir`) is embedded by copying its files; a random one is rebuilt from
its seed (tiny preset only)."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from anystory.components import build_random, save_components
from anystory.export import write_export
from anystory.model import AnyStoryModel
from training.ema import CHECKPOINT_KEY as EMA_KEY
from training.module import AnyStoryModule, check_state

ALLOWED = {"training.module.Stage1Module", "training.module.Stage2Module"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the one-line message names the file or the key."""


def read_checkpoint(path: str | Path) -> tuple[AnyStoryModule, dict]:
    """The stage module (hyper-parameters only: configure_model is not called, nothing is built)
    and the checkpoint, read with weights_only=True: nothing is unpickled. Memory-mapped: the
    optimizer state (twice the weights, for Adam) is never read."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path not in ALLOWED:
        raise CheckpointError(f"{path}: not an AnyStory stage checkpoint (class {class_path!r})")
    module_name, cls_name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), cls_name)(**hparams), checkpoint


def meta_adapter_state(module: AnyStoryModule) -> dict[str, torch.Tensor]:
    """The adapter tensors the module's model has, on the meta device (shapes, no storage)."""
    config = module.model_config()
    with tempfile.TemporaryDirectory() as tok:
        components = build_random(config, tok, device="meta")
    return AnyStoryModel(config, components.unet, components.image_encoder).adapter_state_dict()


def base_writer(module: AnyStoryModule) -> Callable[[Path], object] | None:
    """How base/ is filled: None for a referenced base (`weights`: SDXL), a copy of the toy base's
    own files (`base_dir`), or the random base rebuilt from the seed."""
    hp = module.hparams
    if hp.weights:  # the config's `weights` names the base: it is referenced, not embedded
        return None
    if hp.base_dir:
        source = Path(hp.base_dir)
        if not source.is_dir():
            raise CheckpointError(f"model.init_args.base_dir = {str(source)!r}: not a directory (the toy base it "
                                  "names is embedded in the export)")
        return lambda target: shutil.copytree(source, target, dirs_exist_ok=True)
    try:
        components = module.build_components()  # random tiny weights from the seed
    except ValueError as err:  # a preset that needs weights
        raise CheckpointError(str(err)) from None
    return lambda target: save_components(components, target)


def ema_state(ckpt: str | Path, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's state_dict with the EMA tensors (training.ema.EMA) in place of the raw ones."""
    ema = checkpoint.get(EMA_KEY)
    if not ema:
        raise CheckpointError(f"{ckpt}: no EMA weights ({EMA_KEY}): train with the callback training.ema.EMA "
                              "in trainer.callbacks, or export without --ema")
    state = dict(checkpoint["state_dict"])
    unknown = sorted(f"model.{k}" for k in ema if f"model.{k}" not in state)
    if unknown:
        raise CheckpointError(f"{ckpt}: {EMA_KEY} holds tensors the model does not have: {unknown[:5]}")
    state.update({f"model.{k}": v.to(state[f"model.{k}"].dtype) for k, v in ema.items()})
    return state


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None, ema: bool = False) -> Path:
    print(f"reading {ckpt} (its AnyStory tensors; the base is not loaded)", flush=True)
    module, checkpoint = read_checkpoint(ckpt)
    state = ema_state(ckpt, checkpoint) if ema else checkpoint["state_dict"]
    try:
        check_state(meta_adapter_state(module), state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: {err.args[0]}") from None
    write_base = base_writer(module)
    metadata = {"stage": module.stage, "global_step": int(checkpoint["global_step"]), "checkpoint": str(ckpt)}
    if ema:
        metadata["ema"] = True
    weights = sum(v.numel() for v in state.values())
    print(f"stage {module.stage} at step {metadata['global_step']}: writing {weights / 1e6:.1f} M AnyStory parameters"
          f"{' and the base (under base/)' if write_base else ''} to {out}", flush=True)
    adapters = {key.removeprefix("model."): value for key, value in state.items()}
    return write_export(adapters, module.model_config(), out, write_base,
                        dtype=getattr(torch, dtype) if dtype else None, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="store the AnyStory weights in this dtype (default: as trained)")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights of the trained parts (callback training.ema.EMA)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.dtype, args.ema)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
