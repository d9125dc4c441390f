"""The command line an engineer meets: clear refusals before the work, no verdict never OK,
a recipe accepted where a model is asked for."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core import CancelToken, fit_job, run_job, save_detector
from core.cli import main
from core.recipes import Recipe, save_recipe
from core.sources import SourceError, VideoSource
from tests.conftest import make_part


def test_a_missing_input_is_named_not_found(capsys):
    assert main(["fit", "/nonexistent/ok", "--out", "/tmp/never.okng"]) == 1
    assert "not found: /nonexistent/ok" in capsys.readouterr().err


def test_a_bad_output_folder_is_refused_before_the_fit(monkeypatch, capsys, part_images, tmp_path):
    import core.jobs

    monkeypatch.setattr(core.jobs, "fit_job", lambda *a, **k: pytest.fail("fitted before checking --out"))
    assert main(["fit", *part_images[0], "--out", str(tmp_path / "no" / "such" / "m.okng")]) == 1
    assert "does not exist (nothing was done)" in capsys.readouterr().err


def test_an_existing_folder_as_the_model_file_is_refused_before_the_fit(monkeypatch, capsys, part_images, tmp_path):
    """Found trying the station: `--out <folder>` fitted for minutes, then could not save."""
    import core.jobs

    monkeypatch.setattr(core.jobs, "fit_job", lambda *a, **k: pytest.fail("fitted before checking --out"))
    (tmp_path / "models").mkdir()
    assert main(["fit", *part_images[0], "--out", str(tmp_path / "models")]) == 1
    assert "it is a folder; give a file name inside it (nothing was done)" in capsys.readouterr().err


def test_a_fit_of_only_unreadable_images_says_why(tmp_path, capsys):
    """No OK image could be read: the error names each file and why, in words."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes(cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()[:60])
    paths = [str(tmp_path / n) for n in ("empty.png", "notes.png", "cut.png")]
    assert main(["fit", *paths, "--out", str(tmp_path / "m.okng")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("okng: error: none of the 3 OK images could be read (empty.png: ")
    assert "notes.png: not a readable image (not a picture format the station reads)" in err
    assert "cut.png: " in err and "Error)" not in err  # words, not exception class names


def test_an_empty_recipe_file_is_refused_as_a_recipe(tmp_path, capsys):
    (tmp_path / "cells.okrecipe").write_bytes(b"")
    assert main(["score", "--model", str(tmp_path / "cells.okrecipe"), str(tmp_path)]) == 1
    assert "is not a readable OK/NG recipe" in capsys.readouterr().err


def test_no_verdict_is_never_counted_as_ok(capsys, tmp_path, tiny_config):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):  # too few to hold any out: no calibrated threshold
        p = tmp_path / f"ok{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    det = run_job(fit_job(paths, tiny_config, CancelToken())).detector
    assert det.thresholds is None
    model = save_detector(det, tmp_path / "m.okng")
    ng = tmp_path / "ng.png"
    cv2.imwrite(str(ng), make_part(rng, defect=True))
    assert main(["score", "--model", str(model), str(ng), paths[0]]) == 0
    out, err = capsys.readouterr()
    assert out.count(",?,") == 2 and ",OK," not in out
    assert "no calibrated threshold" in err and "2 images: 0 NG, 0 OK, 2 without a verdict" in err


def test_a_recipe_can_stand_for_its_model_with_its_thresholds(capsys, tmp_path, saved_tiny_model):
    model, defect = saved_tiny_model
    img = tmp_path / "part.png"
    cv2.imwrite(str(img), cv2.cvtColor(defect, cv2.COLOR_RGB2BGR))
    recipe = save_recipe(Recipe("r", [], {}, str(model), image_threshold=1e9, pixel_threshold=1e9),
                         tmp_path / "r.okrecipe")
    assert main(["score", "--model", str(recipe), str(img)]) == 0
    out, err = capsys.readouterr()
    assert ",OK," in out and "using the model of recipe r" in err  # judged at the recipe's threshold
    empty = save_recipe(Recipe("e", [], {}), tmp_path / "e.okrecipe")
    assert main(["score", "--model", str(empty), str(img)]) == 1
    assert "has no fitted model yet" in capsys.readouterr().err
    # export takes a recipe too (it said "not an OK/NG model file ... header too large")
    assert main(["export", str(recipe), "--out", str(tmp_path / "bundle")]) == 0
    from core.bundle import load_bundle
    assert load_bundle(tmp_path / "bundle", None).thresholds.image == 1e9  # with the recipe's thresholds


def test_a_camera_that_cannot_open_says_what_to_do():
    with pytest.raises(SourceError, match="plugged in.*another device index"):
        VideoSource(97).open()
