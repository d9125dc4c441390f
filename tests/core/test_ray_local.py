"""``okng fit/score --ray`` on a Ray started by this test (``ray.init(num_cpus=2)``): the same
model, the same CSV rows, and a killed worker loses and duplicates nothing.

Equality is bit for bit only at the same number of PyTorch threads (float32 sums in the
backbone depend on it): Ray tasks run with one (``--ray-threads`` 1), so the local
reference runs here with one too. The merged float64 statistics differ from the local ones
by rounding (~1e-15); through the inverse covariance that can move a float32 precision entry
by one unit in the last place, so thresholds and calibration scores are compared to float32
precision (1e-6 relative), the statistics to 1e-9.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch

from core.cli import main
from core.jobs import CancelToken, fit_job, run_job
from core.models.patchcore import one_torch_thread
from core.ray_cluster import RayOptions
from core.ray_fit import ray_fit_job
from tests.conftest import make_part

ROOT = Path(__file__).resolve().parents[2]
#: float32 rounding: what derived (not merged) quantities may differ by
FLOAT32 = 1e-6


@pytest.fixture(scope="module")
def ray_here():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """30 parts (3 defective), an unreadable file and a name a spreadsheet would run."""
    d = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(30):
        p = d / (f"=part_{i:02d}.png" if i == 5 else f"part_{i:02d}.png")
        cv2.imwrite(str(p), make_part(rng, size=128, defect=i % 10 == 9))
        paths.append(str(p))
    bad = d / "part_13b.png"
    bad.write_bytes(b"not an image")
    paths.insert(14, str(bad))
    return paths


TINY = ["--weights", "random", "--image-size", "64", "--channels", "24", "--batch-size", "4"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


#: a trained model (the network trains on the driver, on the shards' embeddings in order)
TRAINED_TINY = {"width": 8, "epochs": 2, "batch": 4}


@pytest.mark.parametrize("kind", ["padim", "padim-fusion", "padim-lowrank", "padim-kmeans", "kdad"])
def test_ray_fit_equals_local_fit(ray_here, one_thread, archive, kind):
    from core.detector import DetectorConfig

    params = {"padim-lowrank": {"rank": 10}, "padim-kmeans": {"components": 2}, "kdad": TRAINED_TINY}.get(kind, {})
    config = DetectorConfig.for_model(kind, weights="random", image_size=64, n_channels=24, batch_size=4,
                                      model_params=params)
    local = run_job(fit_job(archive, config, CancelToken(), runtime="torch"))
    remote = run_job(ray_fit_job(archive, config, CancelToken(), RayOptions(), runtime="torch"))
    assert remote.fitted == local.fitted and remote.calibration == local.calibration  # same held-out images
    assert [s.path for s in remote.skipped] == [s.path for s in local.skipped] == [archive[14]]
    want, got = local.detector.model.tensors(), remote.detector.model.tensors()
    assert want.keys() == got.keys()
    for name in want:
        assert relative_error(want[name], got[name]) < 1e-9, name
    assert torch.equal(remote.detector.calibration_embeddings, local.detector.calibration_embeddings)
    assert remote.detector.thresholds.image == pytest.approx(local.detector.thresholds.image, rel=FLOAT32)
    assert remote.detector.thresholds.pixel == pytest.approx(local.detector.thresholds.pixel, rel=FLOAT32)


def same_model_file(local: Path, remote: Path) -> None:
    """Statistics to 1e-9, held-out embeddings equal, thresholds to float32 precision."""
    from core.persistence import read_model_file

    (meta_l, t_l), (meta_r, t_r) = read_model_file(local), read_model_file(remote)
    assert t_l.keys() == t_r.keys()
    for name in t_l:
        tol = FLOAT32 if name.startswith("thresholds.") else 1e-9
        assert relative_error(t_l[name], t_r[name]) < tol, name
    th_l, th_r = meta_l.pop("thresholds"), meta_r.pop("thresholds")
    assert th_l.keys() == th_r.keys()
    assert all(th_r[k] == pytest.approx(th_l[k], rel=FLOAT32) for k in th_l)
    assert meta_l == meta_r


def test_okng_fit_with_ray_writes_the_local_model_file(ray_here, one_thread, archive, tmp_path):
    assert main(["fit", *archive, "--out", str(tmp_path / "local.okng"), *TINY]) == 0
    assert main(["fit", *archive, "--out", str(tmp_path / "ray.okng"), *TINY, "--ray"]) == 0
    same_model_file(tmp_path / "local.okng", tmp_path / "ray.okng")


@pytest.fixture(scope="module")
def model(tmp_path_factory, archive):
    out = tmp_path_factory.mktemp("model") / "parts.okng"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", *archive[:20], "--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(n)
    return str(out)


def score(model: str, paths: list[str], csv: Path, *extra: str) -> int:
    return main(["score", "--model", model, *paths, "--csv", str(csv), *extra])


def test_ray_score_writes_the_local_csv_row_for_row(ray_here, one_thread, model, archive, tmp_path, capsys):
    assert score(model, archive, tmp_path / "local.csv", "--heatmaps", str(tmp_path / "local")) == 0
    local_err = capsys.readouterr().err
    assert score(model, archive, tmp_path / "ray.csv", "--heatmaps", str(tmp_path / "ray"),
                 "--ray", "--ray-chunk", "4") == 0
    ray_err = capsys.readouterr().err
    local, remote = (tmp_path / "local.csv").read_bytes(), (tmp_path / "ray.csv").read_bytes()
    assert remote == local
    rows = local.decode().splitlines()
    assert len(rows) == 1 + len(archive) and ",ERROR," in rows[15] and "=part_05" in rows[6]
    assert f"skipped {archive[14]}" in ray_err and local_err.splitlines()[-1] == ray_err.splitlines()[-1]
    maps = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert len(maps) == len(archive) - 1 and maps == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in maps:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _running_chunk(timeout: float) -> psutil.Process | None:
    """A worker of this test's Ray (a descendant of this process) while it scores a chunk."""
    end = time.monotonic() + timeout
    me = psutil.Process()
    while time.monotonic() < end:
        for proc in me.children(recursive=True):
            try:
                if proc.cmdline()[:1] == ["ray::score_chunk"]:
                    return proc
            except psutil.Error:
                continue
        time.sleep(0.002)
    return None


def test_a_worker_killed_while_scoring_loses_and_duplicates_nothing(ray_here, one_thread, model, archive,
                                                                    tmp_path):
    paths = archive * 3  # 93 images, 12 tasks of 8
    assert score(model, paths, tmp_path / "local.csv") == 0
    result: list[int] = []
    run = threading.Thread(target=lambda: result.append(score(model, paths, tmp_path / "ray.csv", "--ray",
                                                              "--ray-chunk", "8")))
    run.start()
    victim = _running_chunk(timeout=60)
    assert victim is not None, "no Ray worker was seen scoring"
    victim.kill()
    run.join(timeout=120)
    assert not run.is_alive() and result == [0]
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


def test_without_ray_score_does_not_import_it_and_with_it_missing_says_how_to_get_it(model, archive,
                                                                                             tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from core.cli import main
        assert main(["score", "--model", {model!r}, {archive[0]!r}, "--csv", {str(tmp_path / 'a.csv')!r}]) == 0
        print("ray imported:", "ray" in sys.modules)
        sys.modules["ray"] = None  # as if not installed
        print("exit", main(["score", "--model", {model!r}, {archive[0]!r}, "--ray"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ray imported: False" in r.stdout and "exit 1" in r.stdout
    assert "pip install 'okng-station[ray]'" in r.stderr


def test_a_path_caught_by_ray_is_refused_with_the_fix(model, archive, capsys):
    assert main(["score", "--model", model, "--ray", archive[0], archive[1]]) == 2
    assert "write --ray after the paths" in capsys.readouterr().err
