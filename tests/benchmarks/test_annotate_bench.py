"""`benchmarks/annotate.py --smoke`: the auto annotator's benchmark on the CPU with the tiny models.
It must count every image it is given, and its images/s must be its count over its wall time."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_annotate_smoke_counts_every_image() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "annotate.py"), "--smoke", "--threads", "1",
                           "--images", "3", "--batch-sizes", "2", "--size", "96"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", proc.stdout,
                      flags=re.MULTILINE)
    assert len(rows) == 1, proc.stdout
    batch, actors, given, counted, annotated, boxes, wall, rate = rows[0]
    assert (int(batch), int(actors), int(given), int(counted)) == (2, 1, 3, 3)  # 3 images in calls of 2 and 1
    assert int(annotated) == 3  # the caption has noun phrases and the images are big enough: none rejected
    assert float(boxes) <= 9  # at most max_boxes_per_label (3) x 3 labels per image
    assert math.isfinite(float(rate)) and float(rate) > 0
    assert abs(float(rate) - 3 / float(wall)) <= 0.01 * float(rate) + 0.002
    assert "96x96 images" in proc.stdout and "random weights" in proc.stdout
