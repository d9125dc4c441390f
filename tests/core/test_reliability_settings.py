"""Issue 13: every setting is validated up front with a sane range, for the CLI, the GUI
(DetectorConfig) and model files alike; nothing accepted crashes or stalls after the fit."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.cli import main
from core.detector import DetectorConfig
from tests.conftest import make_part


@pytest.fixture(scope="module")
def five_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("five")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        p = d / f"ok_{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    return paths


@pytest.fixture
def no_fit(monkeypatch):
    """Any refusal must come before the first image is fitted."""
    from core.detector import Detector

    def fit_started(*a, **k):
        raise AssertionError("the fit started: the setting was not refused up front")

    monkeypatch.setattr(Detector, "fit_embeddings", fit_started)


BASE = ["--weights", "random", "--image-size", "64", "--channels", "24", "--batch-size", "4"]


@pytest.mark.parametrize("args, setting", [
    (["--sigma", "inf"], "sigma"),
    (["--sigma", "nan"], "sigma"),
    (["--sigma", "1e5"], "sigma"),
    (["--sigma", "-1"], "sigma"),
    (["--epsilon", "inf"], "epsilon"),
    (["--param", "epsilon=Infinity"], "epsilon"),
    (["--param", "epsilon=NaN"], "epsilon"),
    (["--param", "epsilon=0"], "epsilon"),
    (["--topk", "0"], "topk"),
    (["--topk", "5000"], "topk"),  # a 64x64 map has 4096 pixels
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "100000"], "batch_size"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**40)], "seed"),
    (["--false-alarm-rate", "2"], "false_alarm_rate"),
    (["--false-alarm-rate", "-0.1"], "false_alarm_rate"),
    (["--false-alarm-rate", "nan"], "false_alarm_rate"),
    (["--image-size", "16"], "image_size"),
    (["--image-size", "100000"], "image_size"),
    (["--stages", "3,2"], "stages"),
    (["--stages", "2,99"], "stages"),
    (["--channels", "500"], "n_channels"),          # lite0 stages 2,3 have 152; was cut silently
    (["--model", "padim-kmeans", "--param", "components=50"], "components"),  # 5 images
    (["--model", "padim-kmeans", "--param", "components=5"], "components"),   # 4 fitted after hold-out
    (["--model", "patchcore", "--param", "coreset_ratio=1e-9"], "coreset_ratio"),
    (["--model", "patchcore", "--param", "neighbourhood=999"], "neighbourhood"),
    (["--model", "patchcore", "--param", "neighbourhood=4"], "neighbourhood"),
    (["--model", "padim-lowrank", "--param", "rank=1000"], "rank"),         # 24 channels
    (["--model", "padim-fusion", "--param", "stage_weights=[1, Infinity]"], "stage_weights"),
    (["--model", "padim-kmeans", "--param", "iterations=100000000"], "iterations"),
])
def test_bad_settings_are_refused_before_the_fit_naming_the_setting(five_images, tmp_path, capsys, no_fit,
                                                                    args, setting):
    out = tmp_path / "m.okng"
    code = main(["fit", *five_images, "--out", str(out), *BASE, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("okng: error:") and setting in err and "Traceback" not in err
    assert any(w in err for w in (" from ", "must be", "choose", "at most", "needed"))  # says what is accepted
    assert not out.exists()


def test_channels_beyond_the_stages_name_the_available_count(five_images, tmp_path, capsys, no_fit):
    main(["fit", *five_images, "--out", str(tmp_path / "m.okng"), *BASE[:4], "--channels", "500"])
    assert "have 152 channels" in capsys.readouterr().err


def test_rank_above_the_real_channel_count_with_all_channels(five_images, tmp_path, capsys, no_fit):
    """--channels 0 (all): the count is known once the backbone is loaded."""
    code = main(["fit", *five_images, "--out", str(tmp_path / "m.okng"), *BASE[:4], "--channels", "0",
                 "--model", "padim-lowrank", "--param", "rank=1000"])
    err = capsys.readouterr().err
    assert code == 2 and "rank" in err and "152" in err


def test_sane_settings_are_accepted():
    DetectorConfig()
    DetectorConfig(sigma=0, topk=1, batch_size=1, false_alarm_rate=0.0, calibration_fraction=0.0, seed=0)
    DetectorConfig(image_size=4096, sigma=64, topk=4096**2, seed=2**32 - 1, false_alarm_rate=0.5)
    DetectorConfig(model="padim-lowrank", n_channels=100, model_params={"rank": 100})
    DetectorConfig(model="padim-lowrank", n_channels=24)  # default rank 100: all 24 kept
    DetectorConfig(model="patchcore", model_params={"coreset_ratio": 0.01, "neighbourhood": 5})
    DetectorConfig(model="padim-fusion", model_params={"stage_weights": [1.0, 0.5]})


@pytest.mark.parametrize("change, setting", [
    (dict(calibration_fraction=0.9), "calibration_fraction"),
    (dict(calibration_fraction=float("nan")), "calibration_fraction"),
    (dict(pooling="mean"), "pooling"),
    (dict(n_channels=0), "n_channels"),
    (dict(image_size=224.0), "image_size"),
    (dict(sigma=True), "sigma"),
    (dict(backbone=""), "backbone"),
])
def test_the_config_itself_refuses_what_the_gui_could_pass(change, setting):
    with pytest.raises(ValueError, match=setting):
        DetectorConfig(**change)


# -- memory: estimated before the fit, refused with the reason ---------------------------------
def test_an_image_size_that_needs_more_memory_than_available_is_refused(five_images, tmp_path, capsys,
                                                                       monkeypatch, no_fit):
    """--image-size 4096 needs ~21 GB of float64 statistics alone (512x512 patches x 100^2)."""
    from core.detector import DetectorConfig, estimate_fit_memory

    need, what = estimate_fit_memory(DetectorConfig(image_size=4096), (512, 512), 100, 5)
    assert need > 21e9 and "262144 patches" in what
    monkeypatch.setattr("core.detector.available_memory", lambda: 8e9)
    code = main(["fit", *five_images, "--out", str(tmp_path / "m.okng"), "--weights", "random",
                 "--image-size", "4096"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "needs about" in err and "GB of memory" in err and "8.0 GB is available" in err
    assert "--image-size" in err and "Traceback" not in err


def test_the_default_fit_fits_in_a_modest_machine():
    from core.detector import DetectorConfig, estimate_fit_memory

    need, _ = estimate_fit_memory(DetectorConfig(), (28, 28), 100, 800)
    assert need < 1e9
