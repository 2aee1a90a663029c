"""The real entry points on a tiny model: stage 1 -> export -> stage 2 -> export -> generate;
kill and resume; checkpoint rotation."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.training.cli import env, fit_args, run

pytestmark = pytest.mark.slow


def _ckpt(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def test_two_stages_export_and_generate(shard_dirs, tmp_path):
    run1, run2 = tmp_path / "runs" / "tiny_stage1", tmp_path / "runs" / "tiny_stage2"
    run(fit_args(shard_dirs, stage=1, max_steps=3), tmp_path)
    ckpt1 = _ckpt(run1 / "checkpoints" / "last.ckpt")
    assert ckpt1["global_step"] == 3
    assert list(run1.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert (run1 / "config.yaml").exists() or list(run1.rglob("config.yaml"))
    # The checkpoint holds only what AnyStory adds, never the frozen base.
    assert all(k.startswith("model.") and ".processor." not in k for k in ckpt1["state_dict"])
    assert not any(k.startswith(("model.unet.", "vae.", "text_encoder")) for k in ckpt1["state_dict"])

    export1 = run1 / "export"  # where the stage-2 config looks for it
    run(["--ckpt", str(run1 / "checkpoints" / "last.ckpt"), "--out", str(export1)], tmp_path, module="training.export")
    run(fit_args(shard_dirs, stage=2, max_steps=2), tmp_path)
    export2 = tmp_path / "export2"
    run(["--ckpt", str(run2 / "checkpoints" / "last.ckpt"), "--out", str(export2)], tmp_path, module="training.export")

    w1 = load_file(str(export1 / "anystory.safetensors"))
    w2 = load_file(str(export2 / "anystory.safetensors"))
    assert w1.keys() == w2.keys()
    stage2_keys = [k for k in w1 if k.startswith("routing_qformer.") or ".router." in k]
    frozen_keys = [k for k in w1 if k not in stage2_keys]
    assert all(torch.equal(w1[k], w2[k]) for k in frozen_keys)  # stage 2 leaves the encoder alone
    assert any(not torch.equal(w1[k], w2[k]) for k in stage2_keys)  # and trains the router

    image, maps = tmp_path / "gen.png", tmp_path / "maps.png"
    ref = shard_dirs["val"]
    import json

    import webdataset as wds
    from PIL import Image

    from pipelines.shards.contract import decode_subjects
    sample = list(wds.WebDataset(str(ref / "000000.tar"), shardshuffle=False))[1]  # two subjects
    decoded = decode_subjects(sample, json.loads(sample["json"]))
    subjects = []
    for i in range(2):
        Image.fromarray(decoded.refs[i]).save(tmp_path / f"s{i}.ref.png")
        Image.fromarray(decoded.ref_masks[i]).convert("L").save(tmp_path / f"s{i}.refmask.png")
        subjects += ["--subject", f"{tmp_path / f's{i}.ref.png'},{tmp_path / f's{i}.refmask.png'}"]
    run(["generate", "--checkpoint", str(export2), "--prompt", "things on noise", *subjects, "--out", str(image),
         "--routing-maps", str(maps), "--steps", "3"], tmp_path, module="anystory.cli")
    assert Image.open(image).size == (64, 64) and Image.open(maps).size[0] > 64


def test_killed_run_resumes_from_last_to_the_same_final_step(shard_dirs, tmp_path):
    ckpt_dir = tmp_path / "runs" / "tiny_stage1" / "checkpoints"
    callbacks = tmp_path / "callbacks.yaml"  # a second config replaces the callback list
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1, save_last: true, save_top_k: 2,"
        " monitor: step, mode: max, filename: '{step}'}\n"
        "    - class_path: tests.training.cli.PauseEachStep\n"
    )
    args = fit_args(shard_dirs, stage=1, max_steps=8, extra=["-c", str(callbacks)])
    proc = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        saved = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"]
        if (ckpt_dir / "last.ckpt").exists() and saved:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _ckpt(ckpt_dir / "last.ckpt")["global_step"]
    assert 1 <= killed_at < 8
    run(args + ["--ckpt_path=last"], tmp_path)
    final = _ckpt(ckpt_dir / "last.ckpt")
    assert final["global_step"] == 8
    kept = sorted(p.name for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
    assert len(kept) == 2 and all("step=" in name for name in kept)  # keep-last-k rotation
    steps = sorted(_ckpt(ckpt_dir / name)["global_step"] for name in kept)
    assert steps == [7, 8]
