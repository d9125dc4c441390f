"""``okng`` end to end on real ELPV cells with the offline backbone."""
import csv
import json
import subprocess
import sys

import pytest

from core.cli import main


def okng(*args):
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, elpv_split):
    out = tmp_path_factory.mktemp("cli") / "cells.okng"
    r = okng("fit", *elpv_split.ok_train[:20], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "fitted padim on 20 OK images" in r.stdout
    # 4 held out: the rate comes with its bound and the warning the Thresholds panel shows
    assert "expected false alarms: 0.0% of OK parts (at most 52.7% with 95 % confidence; 4 held-out parts)" \
        " — too few held-out parts to show 1%" in r.stdout
    return out


def test_score_writes_one_csv_row_per_image_in_input_order(cli_model, elpv_split, tmp_path):
    paths = elpv_split.eval_ng[:2] + elpv_split.eval_ok[:2]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    csv_path = tmp_path / "out.csv"
    r = okng("score", "--model", str(cli_model), paths[0], str(bad), *paths[1:], "--csv", str(csv_path),
             "--heatmaps", str(tmp_path / "maps"))
    assert r.returncode == 0, r.stderr
    assert f"skipped {bad}" in r.stderr
    verdicts = [row["verdict"] for row in csv.DictReader(csv_path.open())]
    assert f"5 images: {verdicts.count('NG')} NG, {verdicts.count('OK')} OK, 1 not inspected (runtime" in r.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["path"] for row in rows] == [paths[0], str(bad), *paths[1:]]
    assert {"path", "score", "verdict"} <= set(rows[0])
    assert rows[1]["verdict"] == "ERROR" and "not a readable image" in rows[1]["error"]
    assert all(row["verdict"] in ("OK", "NG") for row in rows if row["path"] != str(bad))
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4
    # nothing readable at all: the rows are written, and the exit status says nothing was judged
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    r = okng("score", "--model", str(cli_model), str(bad), str(empty))
    assert r.returncode == 1 and "okng: error: none of the 2 images could be inspected" in r.stderr
    assert r.stdout.count("ERROR") == 2


def test_eval_reports_auroc_and_writes_json(cli_model, elpv_split, tmp_path):
    j = tmp_path / "eval.json"
    r = okng("eval", "--model", str(cli_model), "--ok", *elpv_split.eval_ok[:8], "--ng", *elpv_split.eval_ng[:8],
             "--json", str(j))
    assert r.returncode == 0, r.stderr
    d = json.loads(j.read_text())
    assert d["n_ok"] == 8 and d["n_ng"] == 8
    assert 0.5 < d["image_auroc"] <= 1.0  # real defects rank above good cells
    assert "image AUROC" in r.stdout
    assert "(runtime " in r.stderr  # what ran the backbone, as okng score says


def test_models_lists_padim_first_on_its_line_and_every_model_once(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[0] == "padim"
    assert [line.split("\t")[0] for line in lines] == ["padim", "patchcore", "padim-kmeans", "padim-lowrank",
                                                         "padim-fusion", "riad", "favae", "kdad"]


def test_errors_are_one_clear_line_and_exit_code_1(tmp_path, capsys):
    assert main(["score", "--model", str(tmp_path / "missing.okng"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("okng: error:") and "Traceback" not in err


def test_fit_on_an_empty_folder_says_no_images(tmp_path, capsys):
    assert main(["fit", str(tmp_path), "--out", str(tmp_path / "m.okng")]) == 1
    assert "no images found" in capsys.readouterr().err


def test_the_progress_bar_counts_epochs_once_a_model_starts_training(monkeypatch):
    import core.cli as cli
    from core.jobs import Progress

    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.n, self.shown = 0, [(total, desc, unit)]
            bars.append(self)

        def refresh(self):
            self.shown.append(self.n)

        def close(self):
            pass

        def set_postfix_str(self, text, refresh=False):
            self.shown.append(text)

    monkeypatch.setattr(cli, "_progress_bar", lambda total, desc, unit="img": Bar(total, desc, unit))

    def fit():
        yield Progress(8, 10, "fitting: 8/10 images")
        yield Progress(1, 200, "training kdad: epoch 1/200, held-out loss 0.6", unit="epoch")
        yield Progress(2, 200, "training kdad: epoch 2/200, held-out loss 0.5", unit="epoch")
        return "fitted"

    assert cli._drive(fit(), "fit") == "fitted"
    assert bars[0].shown == [(10, "fit", "img"), 8]
    assert bars[1].shown == [(200, "train", "epoch"), "epoch 1/200, held-out loss 0.6", 1,
                             "epoch 2/200, held-out loss 0.5", 2]


def test_a_refit_with_hold_out_like_holds_out_what_the_model_held_out(cli_model, elpv_split, tmp_path):
    """Found trying the station: one more OK image re-dealt 7 of the 8 held-out parts of a
    CLI refit (threshold 355.8 -> 338.9); the station's refit keeps them, now okng fit can."""
    from core.model_file import read_checked

    held = read_checked(cli_model)[0]["calibration_paths"]
    assert len(held) == 4 and all(p.startswith("/") for p in held)
    from core.jobs import split_calibration

    more = elpv_split.ok_train[:20] + elpv_split.eval_ok[:2]
    assert len(set(split_calibration(more, 0.2)[1]) & set(held)) < 4  # dealt afresh, they would move
    out = tmp_path / "refit.okng"
    r = okng("fit", *more, "--out", str(out), "--hold-out-like", str(cli_model))
    assert r.returncode == 0, r.stderr
    assert read_checked(out)[0]["calibration_paths"] == held  # 20 % of 22 is still 4: the same four
    fresh = read_checked(cli_model)[0]  # the model asked is only read
    assert fresh["calibration_paths"] == held


def test_fit_can_write_the_recipe_that_okng_serve_and_the_station_open(elpv_split, tmp_path, capsys):
    """Found on a night shift: a model fitted with ``okng fit`` could not be served (serve
    takes recipes), and nothing but the Python API made one."""
    from core.line.command import recipe_warnings
    from core.recipes import load_recipe

    model, recipe = tmp_path / "cells.okng", tmp_path / "cells.okrecipe"
    ok = elpv_split.ok_train[:10]
    assert main(["fit", *ok, "--out", str(model), "--recipe", str(recipe), "--param", "neighbourhood=3",
                 "--pooling", "topk", "--topk", "500"]) == 0
    assert f"recipe {recipe} (okng serve and the station open it)" in capsys.readouterr().out
    r = load_recipe(recipe)
    assert r.name == "cells" and r.ok_paths == [str(p) for p in ok] and r.model_path == str(model)
    assert (r.config["pooling"], r.config["topk"], r.config["model_params"]) == ("topk", 500, {"neighbourhood": 3})
    assert r.image_threshold is None  # the model's own calibrated thresholds
    assert recipe_warnings([recipe]) == []
    assert main(["fit", *ok, "--out", str(tmp_path / "other.okng"), "--recipe", str(recipe)]) == 1
    assert "exists: give a new name" in capsys.readouterr().err and not (tmp_path / "other.okng").exists()
