"""`python -m training.export --ckpt runs/.../last.ckpt --out artifacts/export`: a training
checkpoint -> the directory `anystory generate` loads (anystory.json + anystory.safetensors, and
the base under base/ when it exists nowhere else: random or toy-trained)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from anystory.export import save_export
from training.module import AnyStoryModule

ALLOWED = {"training.module.Stage1Module", "training.module.Stage2Module"}


def module_from_checkpoint(path: str | Path) -> tuple[AnyStoryModule, dict]:
    """Rebuild the stage module from the checkpoint's hyper-parameters and load its weights.
    The checkpoint is read with weights_only=True: nothing is unpickled."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path not in ALLOWED:
        raise ValueError(f"{path}: not an AnyStory stage checkpoint (class {class_path!r})")
    module_name, cls_name = class_path.rsplit(".", 1)
    module = getattr(importlib.import_module(module_name), cls_name)(**hparams)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    return module, checkpoint


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    # An export can take minutes (an SDXL base is built, a toy base written): say what it is doing.
    print(f"reading {ckpt} and building its model (the frozen base included)", flush=True)
    module, checkpoint = module_from_checkpoint(ckpt)
    embed = not module.hparams.weights  # a real SDXL base is referenced, a toy or random one embedded
    metadata = {"stage": module.stage, "global_step": int(checkpoint["global_step"]), "checkpoint": str(ckpt)}
    weights = sum(p.numel() for p in module.model.adapter_state_dict().values())
    print(f"stage {module.stage} at step {metadata['global_step']}: writing {weights / 1e6:.1f} M AnyStory parameters"
          f"{' and the base (under base/)' if embed else ''} to {out}", flush=True)
    return save_export(module.model, out, components=module.components if embed else None,
                       dtype=getattr(torch, dtype) if dtype else None, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="store the AnyStory weights in this dtype (default: as trained)")
    args = parser.parse_args(argv)
    print(f"wrote {export_checkpoint(args.ckpt, args.out, args.dtype)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
