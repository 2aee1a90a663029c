"""Ray on a machine that already runs Ray: with a real `ray start --head` up, the build starts a
private local instance unless `--address` / RAY_ADDRESS names a cluster to attach to.

Which cluster a build used is read from the head's own session logs: every driver that connects to
it leaves `python-core-driver-<job id>_<pid>.log` there. RAY_TMPDIR isolates this head (and the
`ray_current_cluster` file a bare `ray.init()` would follow) from any other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipelines.helpers import read_stats, toy_params, write_params
from tests.pipelines.processes import BIN, REPO, child_env, free_ports, kill_tree

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def ray_head(env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A 1-CPU Ray head without dashboard; yields its GCS address and its session's log folder."""
    gcs, client, agent, metrics, runtime_env, node_mgr, obj_mgr, agent_grpc = free_ports(8)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1", "--num-gpus=0", f"--port={gcs}",
           "--include-dashboard=false", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--dashboard-agent-grpc-port={agent_grpc}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address_file = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 120
        while not address_file.exists():
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(0.2)
        address = address_file.read_text().strip()
        host, port = address.rsplit(":", 1)
        while True:  # the address file is written once the GCS listens; wait for it anyway
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
                break
            assert time.time() < deadline, "the Ray head's GCS does not answer"
            time.sleep(0.2)
        # Resolved now: a private instance started later moves `session_latest`.
        yield address, (Path(env["RAY_TMPDIR"]) / "ray" / "session_latest").resolve() / "logs"
    finally:
        kill_tree(head, signal.SIGTERM, grace=5)  # the head and what it started, by pid


def drivers(logs: Path) -> set[int]:
    """Pids of the drivers that connected to the head."""
    return {int(n.rsplit("_", 1)[1].split(".")[0]) for n in os.listdir(logs) if n.startswith("python-core-driver-")}


def build(pfile: str, out: Path, env: dict[str, str], *extra: str) -> tuple[int, subprocess.CompletedProcess]:
    proc = subprocess.Popen([sys.executable, "pipelines/build_shards.py", "--params", pfile, "--kind", "unpaired",
                             "--out", str(out), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.pid, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_private_instance_unless_an_address_is_given(tmp_path, toy_dir):
    images = tmp_path / "images"
    images.mkdir()
    coco = json.loads(open(f"{toy_dir}/images/annotations.json").read())
    for img in coco["images"][:3]:
        shutil.copy(f"{toy_dir}/images/{img['file_name']}", images / img["file_name"])
    (images / "captions.jsonl").write_text("".join(
        json.dumps({"file": img["file_name"], "caption": img["caption"],
                    "annotations": [a for a in coco["annotations"] if a["image_id"] == img["id"]]}) + "\n"
        for img in coco["images"][:3]))
    params = toy_params(toy_dir, tmp_path / "unused")
    params["data"]["sources"] = {"unpaired": [{"type": "image_folder", "name": "few", "path": str(images)}],
                                 "paired": []}
    params["data"]["ray"]["num_cpus"] = 2  # what made attaching fail: ray.init refuses num_cpus there
    pfile = write_params(tmp_path / "params.yaml", params)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    env = dict(child_env(), RAY_TMPDIR=ray_tmp)
    try:
        with ray_head(env) as (address, logs):
            pid, private = build(pfile, tmp_path / "private", env)
            assert private.returncode == 0, private.stderr[-3000:]
            assert pid not in drivers(logs)  # it did not attach to the running head
            assert "num_cpus" not in private.stderr

            pid, flag = build(pfile, tmp_path / "flag", env, "--address", address)
            assert flag.returncode == 0, flag.stderr[-3000:]
            assert pid in drivers(logs)
            assert f"warning: data.ray.num_cpus=2 ignored: attaching to the Ray cluster at {address}" in flag.stderr

            pid, by_env = build(pfile, tmp_path / "env", dict(env, RAY_ADDRESS=address))
            assert by_env.returncode == 0, by_env.stderr[-3000:]
            assert pid in drivers(logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for out in ("private", "flag", "env"):
        stats = read_stats(tmp_path / out / "unpaired")
        assert [s["inputs"] for s in stats.values()] == [3]
