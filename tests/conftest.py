"""Shared fixtures: synthetic part images, a tiny detector configuration, real ELPV cells."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# exported embedding graphs of detectors without a model file: a per-run folder, not ~/.cache
# (inherited by the CLI subprocesses the tests start)
if "OKNG_CACHE_DIR" not in os.environ:
    os.environ["OKNG_CACHE_DIR"] = tempfile.mkdtemp(prefix="okng-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OKNG_CACHE_DIR"], True)

import cv2
import numpy as np
import pytest

from core.detector import DetectorConfig


def make_part(rng: np.random.Generator, size: int = 96, defect: bool = False) -> np.ndarray:
    """A textured grey 'part' with a bright ring; ``defect`` paints a dark scratch."""
    yy, xx = np.mgrid[:size, :size]
    img = 120 + 20 * np.sin(xx / 5.0) + rng.normal(0, 6, (size, size))
    cv2.circle(img, (size // 2, size // 2), size // 3, 220, 3)
    if defect:
        cv2.line(img, (size // 4, size // 4), (size // 2, size // 3), 10, 4)
    return np.clip(np.repeat(img[..., None], 3, axis=2), 0, 255).astype(np.uint8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder for exported graphs and derived state (``OKNG_CACHE_DIR``)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("OKNG_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny_config() -> DetectorConfig:
    """Random-weight backbone at 64 px: fast, for tests where accuracy does not matter."""
    return DetectorConfig(weights="random", image_size=64, n_channels=24, batch_size=4)


@pytest.fixture
def part_images(tmp_path):
    """Writes 12 OK parts and 3 defective parts as PNG; returns (ok_paths, ng_paths)."""
    rng = np.random.default_rng(0)
    ok, ng = [], []
    for i in range(12):
        p = tmp_path / f"ok_{i:02d}.png"
        cv2.imwrite(str(p), make_part(rng))
        ok.append(str(p))
    for i in range(3):
        p = tmp_path / f"ng_{i:02d}.png"
        cv2.imwrite(str(p), make_part(rng, defect=True))
        ng.append(str(p))
    return ok, ng


@pytest.fixture(scope="session")
def elpv_split():
    from core.demo import demo_split

    return demo_split()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """A tiny detector fitted on 8 synthetic parts and saved once per session.

    Returns (model path, a defective part image) for tests that abuse model files.
    """
    from core import CancelToken, fit_job, run_job, save_detector

    d = tmp_path_factory.mktemp("tiny-model")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        p = d / f"ok_{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    cfg = DetectorConfig(weights="random", image_size=64, n_channels=24, batch_size=4)
    det = run_job(fit_job(paths, cfg, CancelToken())).detector
    return save_detector(det, d / "original.okng"), make_part(rng, defect=True)


@pytest.fixture
def recipe_session(tmp_path, part_images, tiny_config):
    """An engineer's station session (core, no Qt) on a recipe of the synthetic OK parts, its
    errors and status lines collected in ``errors`` / ``statuses``."""
    from core.jobs import InlineExecutor
    from core.session import InspectionSession

    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    s.errors, s.statuses = [], []
    s.error.connect(s.errors.append)
    s.status.connect(s.statuses.append)
    s.new_recipe("parts", tiny_config, part_images[0])
    s.operator = "ana"
    return s
