from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anystory.export import random_export
from anystory.presets import get_preset


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return random_export(get_preset("tiny"), root / "export", root / "tok")


def _write_subject(path, seed):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[5:35, 8:30, 3] = 255
    Image.fromarray(rgba).save(path)
    return path


def _generate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "anystory.cli", "generate", "--prompt", "two toys", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_writes_image_and_routing_maps(export_dir, tmp_path):
    a = _write_subject(tmp_path / "a.png", 0)
    rgb = tmp_path / "b.png"
    Image.open(_write_subject(tmp_path / "b_rgba.png", 1)).convert("RGB").save(rgb)
    # Half the reference's size, same aspect: resized with a note (a mask of another shape is refused).
    mask = tmp_path / "b_mask.png"
    Image.open(tmp_path / "b_rgba.png").getchannel("A").resize((20, 20), Image.NEAREST).save(mask)
    out, maps = tmp_path / "out" / "image.png", tmp_path / "out" / "maps.png"
    args = ["--checkpoint", str(export_dir), "--subject", str(a), "--subject", f"{rgb},{mask}", "--out", str(out),
            "--routing-maps", str(maps), "--steps", "3", "--seed", "1"]
    first = _generate(*args)
    assert first.returncode == 0, first.stderr
    assert f"note: --subject {rgb},{mask}: mask 20x20 is resized to the reference's 40x40" in first.stderr
    assert "3/3" in first.stderr  # the denoising progress bar
    assert first.stdout == f"wrote {out}\nwrote {maps}\n"
    image = Image.open(out)
    assert image.size == (64, 64)
    assert Image.open(maps).size[0] > 64
    pixels = np.asarray(image)
    again = _generate(*args, "--quiet")
    assert again.returncode == 0, again.stderr
    assert "3/3" not in again.stderr and "it/s" not in again.stderr
    assert np.array_equal(pixels, np.asarray(Image.open(out)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["image.png", "maps.png"]  # no temporary left


def _minimal_export(export_dir: Path, root: Path) -> Path:
    """anystory.json and anystory.safetensors only: enough for every check that precedes the base."""
    target = root / "export"
    target.mkdir()
    for name in ("anystory.json", "anystory.safetensors"):
        shutil.copy(export_dir / name, target / name)
    return target


def _edit_config(export: Path, edit) -> Path:
    path = export / "anystory.json"
    document = json.loads(path.read_text())
    edit(document["config"])
    path.write_text(json.dumps(document))
    return path


def _case(name: str, export_dir: Path, root: Path) -> tuple[list[str], str]:
    """A user's mistake: the command line arguments, and the one line the CLI must answer."""
    ref = _write_subject(root / "ref.png", 0)
    out = root / "result" / "out.png"
    base = ["--checkpoint", str(export_dir), "--subject", str(ref), "--out", str(out)]
    if name == "missing export folder":
        missing = root / "no_export"
        return [*base, "--checkpoint", str(missing)], f"--checkpoint: {missing}: no such directory"
    if name == "not an export folder":
        (root / "empty").mkdir()
        return ([*base, "--checkpoint", str(root / "empty")],
                f"--checkpoint: {root / 'empty' / 'anystory.json'} not found: is {root / 'empty'} an AnyStory "
                f"export directory?")
    if name == "truncated weights":
        export = _minimal_export(export_dir, root)
        weights = export / "anystory.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        return ([*base, "--checkpoint", str(export)],
                f"--checkpoint: {weights}: not a readable safetensors file (Error while deserializing header: "
                "incomplete metadata, file not fully covered)")
    if name == "corrupt base weights":
        export = _minimal_export(export_dir, root)
        unet = export / "base" / "unet" / "diffusion_pytorch_model.safetensors"
        unet.parent.mkdir(parents=True)
        unet.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
        return ([*base, "--checkpoint", str(export)],
                f"--checkpoint: {unet}: not a readable safetensors file (Error while deserializing header: "
                "header too large)")
    if name == "typo in the config":
        export = _minimal_export(export_dir, root)
        path = _edit_config(export, lambda c: c["router"].update(widht=c["router"].pop("width")))
        return ([*base, "--checkpoint", str(export)],
                f"--checkpoint: {path}: config.router.widht: unknown key (allowed: ffn, heads, routing_dim, width)")
    if name == "wrong type in the config":
        export = _minimal_export(export_dir, root)
        path = _edit_config(export, lambda c: c.update(resolution="sixty-four"))
        return ([*base, "--checkpoint", str(export)],
                f"--checkpoint: {path}: config.resolution: expected int, got 'sixty-four'")
    if name == "base weights not set":
        export = _minimal_export(export_dir, root)
        path = export / "anystory.json"
        document = json.loads(path.read_text())
        document["base_embedded"] = False  # and config.weights is empty, as in an embedded export
        path.write_text(json.dumps(document))
        return ([*base, "--checkpoint", str(export)],
                f"--checkpoint: {path}: config.weights.base is not set and the base is not embedded: give a local "
                "path or a hub id already in the local cache")
    if name == "broken json":
        export = _minimal_export(export_dir, root)
        path = export / "anystory.json"
        text = path.read_text()
        path.write_text(text[: len(text) // 2])
        try:
            json.loads(text[: len(text) // 2])
        except json.JSONDecodeError as err:
            where = f"{err.msg} at line {err.lineno} column {err.colno}"
        return [*base, "--checkpoint", str(export)], f"--checkpoint: {path}: not valid JSON ({where})"
    if name == "reference not an image":
        fake = root / "notes.png"
        fake.write_text("not a picture")
        return ([*base, "--subject", str(fake)],
                f"--subject {fake}: {fake} is not a readable image (cannot identify image file '{fake}')")
    if name == "missing reference":
        return [*base, "--subject", str(root / "gone.png")], f"--subject {root / 'gone.png'}: {root / 'gone.png'} does not exist"
    if name == "empty mask":
        rgb, mask = root / "rgb.png", root / "mask.png"
        Image.open(ref).convert("RGB").save(rgb)
        Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(mask)
        return [*base, "--subject", f"{rgb},{mask}"], f"--subject {rgb},{mask}: the reference mask is empty"
    if name == "mask of another shape":
        rgb, mask = root / "rgb.png", root / "mask.png"
        Image.open(ref).convert("RGB").save(rgb)
        Image.fromarray(np.full((80, 50), 255, dtype=np.uint8)).save(mask)  # 50 wide, 80 high
        return ([*base, "--subject", f"{rgb},{mask}"],
                f"--subject {rgb},{mask}: mask is 50x80, reference is 40x40 (not the same aspect ratio)")
    if name == "zero steps":
        return [*base, "--steps", "0"], "argument --steps: must be at least 1, got 0"
    if name == "negative guidance":
        return [*base, "--cfg", "-3"], "argument --cfg: must be >= 0 (0 to 1: no guidance), got -3"
    if name == "unwritable out":
        blocker = root / "blocker"
        blocker.write_text("a file, not a folder")
        return [*base, "--out", str(blocker / "out.png")], f"--out {blocker / 'out.png'}: {blocker} is not a directory"
    if name == "out without image format":
        return [*base, "--out", str(root / "out.txt")], f"--out {root / 'out.txt'}: unknown image format '.txt' (use .png or .jpg)"
    if name == "unwritable routing maps":
        blocker = root / "blocker"
        blocker.write_text("a file, not a folder")
        maps = blocker / "maps.png"
        return [*base, "--routing-maps", str(maps)], f"--routing-maps {maps}: {blocker} is not a directory"
    if name == "routing maps without router":
        return ([*base, "--routing-maps", str(root / "maps.png"), "--no-router"],
                "--routing-maps: draws the router's maps, which --no-router turns off")
    if name == "height not a multiple":
        return [*base, "--height", "50"], "--height 50: must be a multiple of 16 for this model"
    raise AssertionError(name)


MISTAKES = [
    "missing export folder", "not an export folder", "truncated weights", "corrupt base weights",
    "typo in the config", "wrong type in the config", "base weights not set", "broken json", "reference not an image", "missing reference",
    "empty mask", "mask of another shape", "zero steps", "negative guidance", "unwritable out",
    "out without image format", "unwritable routing maps", "routing maps without router", "height not a multiple",
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_user_mistake_is_one_line_and_exit_code_2(mistake, export_dir, tmp_path):
    args, message = _case(mistake, export_dir, tmp_path)
    before, export_before = _tree(tmp_path), _tree(export_dir)
    proc = _generate(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"anystory generate: error: {message}\n"
    assert proc.stdout == ""
    assert _tree(tmp_path) == before and _tree(export_dir) == export_before  # nothing written, nothing changed


def test_a_reference_without_mask_is_named(export_dir, tmp_path):
    rgb = tmp_path / "plain.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(rgb)
    proc = _generate("--checkpoint", str(export_dir), "--subject", str(rgb), "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 2
    assert proc.stderr == (f"anystory generate: error: --subject {rgb}: a reference needs a mask: give a mask image "
                           "or an image with an alpha channel\n")
    assert not (tmp_path / "o.png").exists()


def test_a_failed_write_leaves_nothing_new(tmp_path):
    from anystory.cli import UserError, write_images

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    good = tmp_path / "new" / "deeper" / "image.png"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    # Passed the checks, then the second output became impossible (here: its folder is a file).
    with pytest.raises(UserError, match="cannot write"):
        write_images({good: image, blocker / "maps.png": image})
    assert sorted(os.listdir(tmp_path)) == ["blocker"]
    write_images({good: image})
    assert np.array_equal(np.asarray(Image.open(good)), np.asarray(image))
    assert sorted(os.listdir(good.parent)) == ["image.png"]
