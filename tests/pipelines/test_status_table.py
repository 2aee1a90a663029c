"""The per-input status table next to each shard, against inputs whose fate is known: the files
`corrupt_toyworld` breaks on purpose, and the sizes and keys read back independently."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import av
import pyarrow.parquet as pq
from PIL import Image

from tests.pipelines.helpers import read_samples, toy_params
from tests.pipelines.processes import REPO, child_env
from tests.pipelines.test_build import CORRUPT, build, corrupt_toyworld


def table(folder) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.status.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def test_every_input_has_a_status_row_with_its_reason_keys_and_size(tmp_path, toy_dir):
    toy = corrupt_toyworld(tmp_path, toy_dir)
    params = toy_params(toy, tmp_path / "out")
    build(params, "unpaired")
    build(params, "paired")
    folder = tmp_path / "out" / "unpaired"
    rows = table(folder)
    names = [img["file_name"] for img in json.loads(open(f"{toy}/images/annotations.json").read())["images"]]
    assert sorted(r["input_id"] for r in rows) == sorted(names)  # each input once, by name
    by_id = {r["input_id"]: r for r in rows}
    assert {r["source"] for r in rows} == {"toyworld"}
    for name, reason in CORRUPT.items():
        assert by_id[name]["status"] == reason and by_id[name]["keys"] == []
    for name in ("zz_truncated.jpg", "zz_empty.jpg", "zz_text.jpg"):  # never decoded: no size
        assert by_id[name]["width"] is None and by_id[name]["height"] is None
    # The blank image decoded, then lost its (no) subjects.
    assert (by_id["zz_nothing.png"]["width"], by_id["zz_nothing.png"]["height"]) == (96, 96)

    # Written inputs: exactly the keys the tars hold for that input, and the input file's own size.
    keys_by_input: dict[str, list[str]] = {}
    for s in read_samples(folder):
        keys_by_input.setdefault(json.loads(s["json"])["source_id"], []).append(s["__key__"])
    ok = {r["input_id"]: r for r in rows if r["status"] == "ok"}
    assert {i: r["keys"] for i, r in ok.items()} == keys_by_input
    for name, r in by_id.items():
        if name not in CORRUPT:
            with Image.open(f"{toy}/images/{name}") as im:
                assert (r["width"], r["height"]) == im.size
            assert r["status"] in ("ok", "no_subjects")  # toyworld's empty scenes have no subject
    # The stats count what the table lists.
    for path in glob.glob(os.path.join(folder, "*.stats.json")):
        stats = json.loads(open(path).read())
        shard_rows = pq.read_table(path.replace(".stats.json", ".status.parquet")).to_pylist()
        assert stats["written"] == sum(r["status"] == "ok" for r in shard_rows) and stats["inputs"] == len(shard_rows)

    videos = {r["input_id"]: r for r in table(tmp_path / "out" / "paired")}
    assert sorted(videos) == sorted(n for n in os.listdir(f"{toy}/videos") if n.endswith(".mp4"))
    assert videos["clip_zz_corrupt.mp4"]["status"] == "undecodable_video"
    for name, r in videos.items():
        if r["status"] != "undecodable_video":
            with av.open(f"{toy}/videos/{name}") as container:
                stream = container.streams.video[0]
                assert (r["width"], r["height"]) == (stream.codec_context.width, stream.codec_context.height)

    # pipelines.summary reads the table back: the rejected inputs by reason, by name.
    proc = subprocess.run([sys.executable, "-m", "pipelines.summary", str(folder), "--reason", "truncated"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1:] == ["truncated (1):", "  toyworld/zz_truncated.jpg"]
    counts = dict(part.split("=") for part in lines[0].split()[2:])
    assert int(counts["ok"]) == len(ok) and int(counts["empty_file"]) == 1 and lines[0].startswith(
        f"inputs: {len(names)} ")
