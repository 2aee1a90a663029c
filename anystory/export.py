"""Export: one safetensors file with everything AnyStory adds to the base model, plus a JSON config.
`anystory generate` loads this directory as it is; loading first validates the directory
(anystory/export_format.py), then checks every key and shape and names what does not match;
nothing is unpickled. For random- or toy-trained bases (the `tiny` preset) the base components are
embedded under base/ in the diffusers layout."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from anystory.components import BaseComponents, build_random, load_pretrained, save_components
from anystory.config import AnyStoryConfig
from anystory.export_format import BASE_DIR, CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, validate_export
from anystory.model import AnyStoryModel


class ExportMismatchError(ValueError):
    """The exported weights do not fit the model the config describes."""


def save_export(
    model: AnyStoryModel,
    directory: str | Path,
    components: BaseComponents | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write anystory.safetensors + anystory.json. With `components`, embed the base under base/
    (for bases that exist nowhere else); without, the config's `weights` names where the base is."""
    write_base = (lambda base: save_components(components, base)) if components is not None else None
    return write_export(model.adapter_state_dict(), model.config, directory, write_base, dtype, metadata)


def write_export(
    state: dict[str, torch.Tensor],
    config: AnyStoryConfig,
    directory: str | Path,
    write_base: Callable[[Path], object] | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict | None = None,
) -> Path:
    """The writer behind `save_export`, from the adapter tensors alone (no live model: a training
    checkpoint already holds them). `write_base` fills base/ for an embedded base."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in state.items()
    }
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    config = config.to_dict()
    if write_base is not None:
        write_base(directory / BASE_DIR)
        config["weights"] = {}
    document = {
        "format_version": FORMAT_VERSION,
        "base_embedded": write_base is not None,
        "config": config,
        "metadata": metadata or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return directory


def load_adapter_weights(model: AnyStoryModel, path: str | Path, keys: Collection[str] | None = None) -> None:
    """Load the exported weights into the model; any missing, unexpected or misshapen key is an
    error that names it (no strict=False, no renaming). `keys` loads only those entries (each must
    be in the file with the model's shape; the file's other entries are not read): stage 2 takes
    the stage-1 encoder this way and builds its routers afresh, whatever their width was."""
    state = load_file(str(path))
    expected = model.adapter_state_dict()
    if keys is not None:
        unknown = sorted(set(keys) - set(expected))
        if unknown:
            raise KeyError(f"not adapter keys of the model: {unknown[:10]}")
        expected = {k: expected[k] for k in keys}
        state = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        lines = [f"{path} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise ExportMismatchError("\n".join(lines))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


def load_export(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[AnyStoryModel, BaseComponents]:
    directory = Path(directory)
    config, embedded = validate_export(directory)
    if embedded:
        base = directory / BASE_DIR
        config.weights = {"base": str(base), "image_encoder": str(base / "image_encoder")}
    components = load_pretrained(config, torch_dtype=dtype)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2,
                   components.image_encoder):
        module.to(device)
    model = AnyStoryModel(config, components.unet, components.image_encoder)
    load_adapter_weights(model, directory / WEIGHTS_FILE)
    # The adapters are built in float32 (they are trained); inference runs everything in one dtype.
    return model.to(device=device, dtype=dtype).eval(), components


def random_export(preset: AnyStoryConfig, directory: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight export with an embedded base (tests and smoke runs of the CLI)."""
    components = build_random(preset, tokenizer_dir, seed=seed)
    torch.manual_seed(seed)
    model = AnyStoryModel(preset, components.unet, components.image_encoder)
    return save_export(model, directory, components=components)
