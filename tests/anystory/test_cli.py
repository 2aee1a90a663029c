from __future__ import annotations

import subprocess
import sys

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


def test_generate_writes_image_and_routing_maps(export_dir, tmp_path):
    a = _write_subject(tmp_path / "a.png", 0)
    rgb = tmp_path / "b.png"
    Image.open(_write_subject(tmp_path / "b_rgba.png", 1)).convert("RGB").save(rgb)
    mask = tmp_path / "b_mask.png"
    Image.open(tmp_path / "b_rgba.png").getchannel("A").save(mask)
    out, maps = tmp_path / "out" / "image.png", tmp_path / "out" / "maps.png"
    cmd = [sys.executable, "-m", "anystory.cli", "generate", "--checkpoint", str(export_dir), "--prompt", "two toys",
           "--subject", str(a), "--subject", f"{rgb},{mask}", "--out", str(out), "--routing-maps", str(maps),
           "--steps", "3", "--seed", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    image = Image.open(out)
    assert image.size == (64, 64)
    assert Image.open(maps).size[0] > 64
    first = np.asarray(image)
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert np.array_equal(first, np.asarray(Image.open(out)))


def test_generate_rejects_a_reference_without_mask(export_dir, tmp_path):
    rgb = tmp_path / "plain.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(rgb)
    proc = subprocess.run(
        [sys.executable, "-m", "anystory.cli", "generate", "--checkpoint", str(export_dir), "--prompt", "x",
         "--subject", str(rgb), "--out", str(tmp_path / "o.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "alpha channel" in proc.stderr
    assert not (tmp_path / "o.png").exists()
