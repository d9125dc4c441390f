"""``contrast="stretch"``: each image's grey levels from its 1st to its 99th percentile become
the network's full range; ``contrast="flatten"``: its shading (brightness changing slowly
across the part) is taken out first. Both the same way in a fit, at inspection, in a saved
model and on every runtime (README, "Which model": parts whose exposure or lighting varies)."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from core.cli import _config_from_args, build_parser
from core.detector import DetectorConfig
from core.imageio import load_image, network_input
from core.jobs import CancelToken, fit_job, inspect_paths, run_job
from core.persistence import load_detector, save_detector
from tests.conftest import make_part


def _exposed(img: np.ndarray, gain: float, offset: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def test_a_stretched_part_looks_the_same_however_it_was_exposed():
    part = make_part(np.random.default_rng(0), size=64)
    dark, bright = _exposed(part, 0.5, 10), _exposed(part, 1.0, 30)
    plain = network_input([dark, bright], 64)
    assert np.abs(plain[0] - plain[1]).mean() > 0.1  # as recorded: another picture
    stretched = network_input([dark, bright], 64, "stretch")
    assert np.abs(stretched[0] - stretched[1]).mean() < 0.02  # stretched: the same part
    assert stretched.min() == 0.0 and stretched.max() == 1.0 and stretched.dtype == np.float32
    flat = np.full((64, 64, 3), 77, np.uint8)  # one grey level: nothing to stretch
    assert np.array_equal(network_input([flat], 64, "stretch"), network_input([flat], 64))
    with pytest.raises(ValueError, match="unknown contrast rule"):
        network_input([flat], 64, "equalise")


def _lit(img: np.ndarray, left: float, right: float) -> np.ndarray:
    """``img`` under light that adds ``left`` grey levels at its left edge, ``right`` at its right."""
    ramp = np.linspace(left, right, img.shape[1], dtype=np.float32)[None, :, None]
    return np.clip(img.astype(np.float32) + ramp, 0, 255).astype(np.uint8)


def _textured_part(size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(3)
    grain = cv2.GaussianBlur(rng.normal(128, 80, (size, size)).astype(np.float32), (0, 0), 1.0)  # sd 22
    return np.repeat(np.clip(grain, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_a_flattened_part_looks_the_same_however_it_was_lit():
    part = _textured_part()
    even, uneven = part, _lit(part, -50, 50)  # one end darker, the other brighter
    stretched = network_input([even, uneven], 128, "stretch")
    flattened = network_input([even, uneven], 128, "flatten")
    assert np.abs(stretched[0] - stretched[1]).mean() > 0.08  # a stretch cannot undo a slope
    assert np.abs(flattened[0] - flattened[1]).mean() < 0.5 * np.abs(stretched[0] - stretched[1]).mean()
    assert flattened.min() == 0.0 and flattened.max() == 1.0 and flattened.dtype == np.float32


def test_flattening_keeps_a_crack_and_a_spot_as_dark_as_they_were_against_their_part():
    part = np.full((128, 128, 3), 150, np.uint8)
    part[:, :, :] = _lit(part, -50, 50)
    cv2.line(part, (20, 30), (100, 40), (40, 40, 40), 2)  # a crack
    cv2.circle(part, (90, 95), 5, (40, 40, 40), -1)  # a spot
    x = network_input([part], 128, "flatten")[0, 0]
    background = np.median(x)
    assert background - x[35, 60] > 0.5 and background - x[95, 90] > 0.5  # both still dark


def test_flattening_leaves_an_image_of_one_level_and_keeps_colours_apart():
    flat = np.full((64, 64, 3), 77, np.uint8)
    assert np.array_equal(network_input([flat], 64, "flatten"), network_input([flat], 64))
    colour = _lit(_textured_part(64), -40, 40)
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 40, 0, 255)  # a red cast
    x = network_input([colour], 64, "flatten")[0]
    assert x[0].mean() > x[1].mean() + 0.05 and np.array_equal(x[1], x[2])  # red stays red; G = B stays


def _readme_shading(grey: np.ndarray) -> np.ndarray:
    """The shading as the README's bundle.json section tells another tool to compute it, with
    the Gaussian written out here rather than taken from OpenCV."""
    n = max(4, min(grey.shape) // 8)
    small = cv2.resize(grey, (n, n), interpolation=cv2.INTER_AREA).astype(np.float64)
    sigma = n / 4.0
    radius = (int(round(8 * sigma + 1)) | 1) // 2
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()

    def reflect_101(i: int) -> int:  # ...2 1 | 0 1 2 ... n-1 | n-2 ..., repeated
        i = abs(i) % (2 * n - 2)
        return i if i < n else 2 * n - 2 - i

    rows = np.array([[reflect_101(i + k) for k in range(-radius, radius + 1)] for i in range(n)])
    blurred = (small[:, rows] * taps).sum(axis=2)  # along each row
    blurred = (blurred[rows, :] * taps[None, :, None]).sum(axis=1)  # then along each column
    return cv2.resize(blurred.astype(np.float32), grey.shape[::-1], interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("size", [64, 108, 224])  # 108: 13.5 pixels, floored
def test_another_tool_following_the_readme_gets_the_same_network_input(size):
    rng = np.random.default_rng(size)
    img = _lit(_textured_part(size), -30, 50)
    img[..., 0] = np.clip(img[..., 0].astype(int) + rng.integers(-20, 20, img.shape[:2]), 0, 255)  # colour
    x = cv2.resize(img, (size, size)).transpose(2, 0, 1).astype(np.float32) / 255.0
    grey = x.mean(axis=0)
    from core.imageio import shading

    bg = _readme_shading(grey)
    assert np.abs(shading(grey) - bg).max() < 1e-5
    flat = x - bg
    lo, hi = np.percentile(grey - bg, (1.0, 99.0))
    expected = np.clip((flat - lo) / (hi - lo), 0.0, 1.0)
    assert np.abs(network_input([img], size, "flatten")[0] - expected).max() < 1e-4


def test_the_stretchs_percentiles_are_numpys_exactly():
    """The histogram shortcut must give what np.percentile gives (the benchmarks measured that)."""
    from core.imageio import _percentiles_u8

    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = rng.integers(1, 60, 2)
        img = rng.integers(rng.integers(0, 100), rng.integers(150, 256), (h, w, 3)).astype(np.uint8)
        assert _percentiles_u8(img, (1.0, 99.0)) == pytest.approx(np.percentile(img, (1.0, 99.0)), abs=1e-9)


def test_the_setting_is_checked_by_name_and_refused_with_tiles():
    with pytest.raises(ValueError, match=r"contrast \(--contrast\) must be one of stretch, flatten or none"):
        DetectorConfig(weights="random", contrast="equalise")
    with pytest.raises(ValueError, match="stretch works on whole images"):
        DetectorConfig(weights="random", contrast="stretch", tile=224)
    with pytest.raises(ValueError, match="flatten works on whole images"):
        DetectorConfig(weights="random", contrast="flatten", tile=224)
    args = build_parser().parse_args(["fit", "x", "--out", "m.okng", "--contrast", "stretch", "--weights", "random"])
    assert _config_from_args(args).contrast == "stretch"
    args = build_parser().parse_args(["fit", "x", "--out", "m.okng", "--contrast", "flatten", "--weights", "random"])
    assert _config_from_args(args).contrast == "flatten"
    args = build_parser().parse_args(["fit", "x", "--out", "m.okng", "--contrast", "as-is", "--weights", "random"])
    assert _config_from_args(args).contrast is None


@pytest.mark.parametrize("contrast", ["stretch", "flatten"])
def test_a_model_fitted_with_a_contrast_rule_scores_the_same_after_saving_and_on_every_path(tmp_path, cache,
                                                                                           contrast):
    rng = np.random.default_rng(5)
    oks = []
    for i in range(10):
        p = tmp_path / f"ok_{i}.png"
        cv2.imwrite(str(p), _exposed(make_part(rng), rng.uniform(0.5, 1.0), rng.uniform(0, 40)))
        oks.append(str(p))
    part = tmp_path / "part.png"
    cv2.imwrite(str(part), _exposed(make_part(rng, defect=True), 0.6, 5))
    cfg = DetectorConfig(weights="random", image_size=64, n_channels=24, batch_size=4, contrast=contrast)
    det = run_job(fit_job(oks, cfg, CancelToken(), runtime="torch")).detector
    direct = det.inspect([load_image(str(part))])[0].score
    batched = inspect_paths([str(part)], det)[0].inspection.score  # the decode thread's path
    loaded = load_detector(save_detector(det, tmp_path / "m.okng"), runtime="torch")
    assert loaded.config.contrast == contrast
    assert batched == pytest.approx(direct, rel=1e-5)
    assert loaded.inspect([load_image(str(part))])[0].score == pytest.approx(direct, rel=1e-4)
    if importlib.util.find_spec("onnxruntime") is not None:  # okng score's lean path (no PyTorch)
        from core.lean_inspection import LeanDetector, load_lean
        from core.runtime import ensure_graph

        ensure_graph(det.embedder, tmp_path / "m.okng")
        lean = load_lean(tmp_path / "m.okng", "onnxruntime")
        assert isinstance(lean, LeanDetector) and lean.config.contrast == contrast
        assert lean.inspect([load_image(str(part))])[0].score == pytest.approx(direct, rel=1e-3)
    plain = run_job(fit_job(oks, cfg.with_(contrast=None), CancelToken(), runtime="torch")).detector
    assert plain.inspect([load_image(str(part))])[0].score != pytest.approx(direct, rel=1e-3)  # it is applied
