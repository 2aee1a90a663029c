"""training.export reads no base: the export of a checkpoint equals the one the old way made
(rebuild the module with its base, load the checkpoint, save_export) for a referenced base, a toy
base (base_dir) and a random one; with the referenced base gone it still succeeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anystory.components import build_random, save_components
from anystory.export import save_export
from anystory.presets import get_preset
from training.export import main
from training.module import Stage1Module, Stage2Module


def _checkpoint(path: Path, cls, noise_seed: int, **hparams) -> Path:
    """A checkpoint as Lightning writes it (hyper-parameters with the CLI's class path, the module's
    state_dict), its adapter tensors moved away from their initial values."""
    module = cls(**hparams)
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}  # what Lightning gathers, then hands to the hook
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    generator = torch.Generator().manual_seed(noise_seed)
    state = {k: v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in state.items()}
    hyper = {**dict(module.hparams), "_class_path": f"training.module.{cls.__name__}"}
    torch.save({"hyper_parameters": hyper, "state_dict": state, "global_step": 7}, path)
    return path


def _old_export(ckpt: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """What training.export did before: the whole module, its base loaded, the checkpoint copied in."""
    checkpoint = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    cls = Stage1Module if checkpoint["hyper_parameters"]["_class_path"].endswith("Stage1Module") else Stage2Module
    module = cls(**hparams)
    module.configure_model()
    with torch.no_grad():
        for key, value in module.model.adapter_state_dict().items():
            value.copy_(checkpoint["state_dict"][f"model.{key}"])
    metadata = {"stage": module.stage, "global_step": int(checkpoint["global_step"]), "checkpoint": str(ckpt)}
    return save_export(module.model, out, components=None if hparams["weights"] else module.components,
                       dtype=dtype, metadata=metadata)


def _assert_same_export(a: Path, b: Path) -> None:
    assert json.loads((a / "anystory.json").read_text()) == json.loads((b / "anystory.json").read_text())
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for name in files_a:
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key}"


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_base")
    save_components(build_random(get_preset("tiny"), root / "tok", seed=3), root / "base")
    return root / "base"


def test_referenced_base_is_not_read(toy_base, tmp_path):
    base = tmp_path / "sdxl"
    shutil.copytree(toy_base, base)
    weights = {"base": str(base), "image_encoder": str(base / "image_encoder")}
    ckpt = _checkpoint(tmp_path / "last.ckpt", Stage1Module, 0, weights=weights, tokenizer_dir=str(tmp_path / "tok"))
    old = _old_export(ckpt, tmp_path / "old", torch.bfloat16)
    shutil.rmtree(base)  # the base the checkpoint names no longer exists: the export must not need it
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "new"), "--dtype", "bfloat16"]) == 0
    _assert_same_export(old, tmp_path / "new")
    assert not (tmp_path / "new" / "base").exists()
    assert json.loads((tmp_path / "new" / "anystory.json").read_text())["config"]["weights"] == weights


@pytest.mark.parametrize("cls", [Stage1Module, Stage2Module])
def test_toy_base_is_copied_and_the_export_matches(toy_base, tmp_path, cls):
    ckpt = _checkpoint(tmp_path / "last.ckpt", cls, 1, base_dir=str(toy_base), tokenizer_dir=str(tmp_path / "tok"))
    old = _old_export(ckpt, tmp_path / "old")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "new")]) == 0
    _assert_same_export(old, tmp_path / "new")


def test_random_base_is_rebuilt_from_its_seed(tmp_path):
    ckpt = _checkpoint(tmp_path / "last.ckpt", Stage1Module, 2, seed=5, tokenizer_dir=str(tmp_path / "tok"))
    old = _old_export(ckpt, tmp_path / "old")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "new")]) == 0
    _assert_same_export(old, tmp_path / "new")


def test_errors_are_one_line_and_name_the_key(toy_base, tmp_path, capsys):
    # A toy base that went away: it is what the export embeds, so the export says which key names it.
    checkpoint = torch.load(str(_checkpoint(tmp_path / "ok.ckpt", Stage1Module, 0, base_dir=str(toy_base),
                                            tokenizer_dir=str(tmp_path / "tok"))), weights_only=True)
    checkpoint["hyper_parameters"]["base_dir"] = str(tmp_path / "gone")
    torch.save(checkpoint, tmp_path / "gone.ckpt")
    assert main(["--ckpt", str(tmp_path / "gone.ckpt"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.init_args.base_dir" in err and "gone" in err
    # A checkpoint whose tensors do not fit the preset's model: named, nothing written.
    del checkpoint["state_dict"][next(iter(checkpoint["state_dict"]))]
    checkpoint["hyper_parameters"]["base_dir"] = str(toy_base)
    torch.save(checkpoint, tmp_path / "short.ckpt")
    assert main(["--ckpt", str(tmp_path / "short.ckpt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err and "short.ckpt" in err
    assert not (tmp_path / "b").exists()
