"""The real entry points on a tiny model: stage 1 -> export -> stage 2 -> export -> generate;
kill and resume (logs continued, checkpoint rotation, a corrupt checkpoint refused); progress
lines; unreadable shards."""

from __future__ import annotations

import csv
import hashlib
import re
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


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _train_steps(rows):
    return [int(r["step"]) for r in rows if r.get("train/loss")]


def _wandb_ids(run_dir):
    return sorted(p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*"))


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_stages_export_and_generate(shard_dirs, tmp_path):
    run1, run2 = tmp_path / "runs" / "tiny_stage1", tmp_path / "runs" / "tiny_stage2"
    fit = run(fit_args(shard_dirs, stage=1, max_steps=3), tmp_path)
    # Progress lines in a log (stdout is a pipe here): one per step (log_every_n_steps=1), counting to max_steps.
    progress = [line for line in fit.stdout.splitlines() if line.startswith("step ")]
    number = r"\d+\.\d+"
    pattern = (rf"step (\d)/3 \((\d+)%\) \| {number} steps/s \| {number} samples/s \| loss {number} \| "
               rf"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d")
    matches = [re.fullmatch(pattern, line) for line in progress]
    assert all(matches), progress
    assert [(m.group(1), m.group(2)) for m in matches] == [("1", "33"), ("2", "67"), ("3", "100")]
    assert progress[-1].endswith("ETA 0:00:00") and "training from step 0 to 3" in fit.stdout
    assert "Epoch" not in fit.stdout + fit.stderr  # no epoch bar ("Epoch 0/-2") in a log
    ckpt1 = _ckpt(run1 / "checkpoints" / "last.ckpt")
    assert ckpt1["global_step"] == 3
    assert list(run1.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert (run1 / "config.yaml").exists() or list(run1.rglob("config.yaml"))
    # The checkpoint holds only what AnyStory adds, never the frozen base.
    assert all(k.startswith("model.") and ".processor." not in k for k in ckpt1["state_dict"])
    assert not any(k.startswith(("model.unet.", "vae.", "text_encoder")) for k in ckpt1["state_dict"])

    export1 = run1 / "export"  # where the stage-2 config looks for it
    exported = run(["--ckpt", str(run1 / "checkpoints" / "last.ckpt"), "--out", str(export1)], tmp_path,
                   module="training.export").stdout.splitlines()
    assert exported[0] == f"reading {run1 / 'checkpoints' / 'last.ckpt'} (its AnyStory tensors; the base is not loaded)"
    assert re.fullmatch(rf"stage 1 at step 3: writing \d+\.\d M AnyStory parameters and the base \(under base/\) to "
                        rf"{re.escape(str(export1))}", exported[1]), exported
    assert exported[-1] == f"wrote {export1}"
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
    run_dir, metrics = ckpt_dir.parent, ckpt_dir.parent / "csv" / "metrics.csv"
    first_rows, first_ids = _rows(metrics), _wandb_ids(run_dir)
    # Train rows are logged under step = global_step - 1; the killed run got at least up to its
    # checkpoint's step but one (the checkpoint is written just before its step's row).
    assert set(range(killed_at - 1)) <= set(_train_steps(first_rows))
    assert len(first_ids) == 1 and (run_dir / "wandb" / "run_id").read_text().strip() == first_ids[0]

    run(args + ["--ckpt_path=last"], tmp_path)
    final = _ckpt(ckpt_dir / "last.ckpt")
    assert final["global_step"] == 8
    # The CSV keeps the first run's rows before the resumed step and continues from there, each
    # train step once; W&B continues the same run (offline: a second folder of the same id).
    rows = _rows(metrics)
    kept = [r for r in first_rows if int(r["step"]) < killed_at]
    assert [{k: v for k, v in r.items() if k in first_rows[0]} for r in rows[: len(kept)]] == kept
    steps = _train_steps(rows)
    assert sorted(steps) == sorted(set(steps)) == sorted(set(_train_steps(kept)) | set(range(killed_at, 8)))
    assert _wandb_ids(run_dir) == first_ids * 2

    # A resume from a corrupt checkpoint: one line naming it, exit 2, and not a file of the run changed.
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = _snapshot(tmp_path / "runs")
    failed = subprocess.run([sys.executable, "-m", "training", *args, "--ckpt_path=last"], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"python -m training: error: --ckpt_path {last}: not a readable checkpoint (")
    assert "Traceback" not in failed.stderr
    assert _snapshot(tmp_path / "runs") == before
    kept = sorted(p.name for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
    assert len(kept) == 2 and all("step=" in name for name in kept)  # keep-last-k rotation
    steps = sorted(_ckpt(ckpt_dir / name)["global_step"] for name in kept)
    assert steps == [7, 8]


def test_unreadable_training_shards_end_the_run_with_one_line(shard_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "000000.stats.json").write_text((shard_dirs["train"] / "000000.stats.json").read_text())
    (bad / "000000.tar").write_bytes(bytes(range(256)) * 200)  # not a tar
    args = fit_args({"train": bad, "val": shard_dirs["val"]}, stage=1, max_steps=3)
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"python -m training: error: no sample from any of the 1 shards in 3 reads in a row: {bad / '000000.tar'} "
        "(ReadError)")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs" / "tiny_stage1" / "checkpoints").exists()
