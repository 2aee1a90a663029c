"""The Makefile's bootstrap: a failed `pip install` stops `make` at once and leaves no install stamp.

CI once ran out of disk during the install; the warning filter behind pip swallowed its exit status, the
stamp was written, and the failure surfaced as "No module named pytest" (and would have on every later
`make` too, since the stamp said the venv was complete). These tests run the real Makefile with a
stand-in `.venv` whose pip exits as pip does, so nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _workspace(tmp_path: Path, pip_stderr: str, pip_rc: int) -> Path:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text(f"#!/bin/sh\necho '{pip_stderr}' >&2\nexit {pip_rc}\n")
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    return tmp_path


def _make(target: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run as a top-level make, not as a sub-make of the `make test` that may be running these tests.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", target], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_failed_install_stops_make_and_writes_no_stamp(tmp_path: Path) -> None:
    error = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
    ws = _workspace(tmp_path, error, 1)
    run = _make("test", ws)
    assert run.returncode != 0
    assert error in run.stdout + run.stderr
    assert "-m pytest" not in run.stdout  # stopped before the test command
    assert not (ws / ".venv" / ".installed").exists()


def test_a_successful_install_hides_only_the_location_warning(tmp_path: Path) -> None:
    ws = _workspace(tmp_path, "WARNING: Location '/opt/wheels' is ignored", 0)
    run = _make("venv", ws)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is ignored" not in run.stdout + run.stderr
    assert (ws / ".venv" / ".installed").exists()
