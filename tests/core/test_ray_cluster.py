"""``okng --ray host:port`` against a real two-node Ray cluster on this machine: a head
(``ray start --head``) and one more node (``ray start --address``), one CPU each, started
by this test on free ports in its own temp dir and stopped at the end (only the processes
it started: ``ray stop`` would stop every Ray on the machine).

The Ray commands run as separate processes, as an engineer would run them; the local
reference runs in the test, with one thread like the Ray tasks (see test_ray_local.py).
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from core.cli import main
from core.models.patchcore import one_torch_thread
from tests.conftest import make_part

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["--weights", "random", "--image-size", "64", "--channels", "24", "--batch-size", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    # token authentication off: this private test cluster listens on 127.0.0.1 only
    return dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                OMP_NUM_THREADS="1")


def start_node(tmp: str, log: str, *args: str) -> subprocess.Popen:
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                                                    "runtime-env-agent-port", "metrics-export-port")]
    cmd = [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1", "--node-ip-address=127.0.0.1",
           f"--temp-dir={tmp}", *ports, *args]
    return subprocess.Popen(cmd, env=cluster_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_started(proc: subprocess.Popen, log: str, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while "Ray runtime started" not in Path(log).read_text():
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        assert time.monotonic() < end, "ray start did not finish"
        time.sleep(0.2)


def stop(nodes: list[subprocess.Popen], tmp: str) -> None:
    """SIGTERM to each ``ray start --block`` (it stops its node's processes), then SIGKILL to
    whatever still runs from this cluster's temp dir."""
    for proc in nodes:
        proc.terminate()
    for proc in nodes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="okng-ray-test-")  # short: Ray's socket paths must fit in 107 bytes
    logs = tmp_path_factory.mktemp("ray-logs")
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        nodes.append(start_node(tmp, str(logs / "head.log"), "--head", f"--port={port}", "--include-dashboard=false"))
        wait_started(nodes[0], str(logs / "head.log"))
        nodes.append(start_node(tmp, str(logs / "node.log"), f"--address={address}"))
        wait_started(nodes[1], str(logs / "node.log"))
        yield address
    finally:
        stop(nodes, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(24):
        p = d / f"part_{i:02d}.png"
        cv2.imwrite(str(p), make_part(rng, size=128, defect=i % 8 == 7))
        paths.append(str(p))
    (d / "broken.png").write_bytes(b"\x89PNG truncated")
    paths.insert(3, str(d / "broken.png"))
    return paths


def okng(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=300,
                       env=cluster_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_node_cluster_fits_the_local_model_and_scores_the_local_csv(cluster, parts, tmp_path):
    from tests.core.test_ray_local import same_model_file

    with one_torch_thread():  # the local reference with the one PyTorch thread of a Ray task
        assert main(["fit", *parts, "--out", str(tmp_path / "local.okng"), *TINY]) == 0
    okng("fit", *parts, "--out", str(tmp_path / "ray.okng"), *TINY, "--ray", cluster)
    same_model_file(tmp_path / "local.okng", tmp_path / "ray.okng")

    model = str(tmp_path / "local.okng")
    with one_torch_thread():  # the local reference with the one PyTorch thread of a Ray task
        assert main(["score", "--model", model, *parts, "--csv", str(tmp_path / "local.csv")]) == 0
    r = okng("score", "--model", model, *parts, "--csv", str(tmp_path / "ray.csv"), f"--ray={cluster}",
             "--ray-chunk", "4")
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    rows = list(csv.DictReader((tmp_path / "ray.csv").open()))
    assert [row["path"] for row in rows] == parts and rows[3]["verdict"] == "ERROR"
    assert f"skipped {parts[3]}" in r.stderr


def test_the_cluster_has_two_nodes_and_both_ran_tasks(cluster):
    """Two live nodes, and a task pinned to each runs there. (Four unpinned tasks used to show
    both nodes at work only when the second node's worker started in time: one CI run saw
    all four on the head node.)"""
    code = f"""
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address={cluster!r})
@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
ran = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
print(len(nodes), len(set(ray.get(ran)) & set(nodes)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cluster_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["2", "2"]
