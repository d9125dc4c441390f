"""``okng serve`` on the command line: what it needs, and that ``okng score`` does not."""
from __future__ import annotations

import subprocess
import sys

from core.recipes import Recipe, save_recipe

LINE_MODULES = ("asyncua", "pymodbus", "paho")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_command_line_and_okng_score_never_import_the_protocol_libraries(saved_tiny_model, tmp_path):
    import cv2

    model, defective = saved_tiny_model
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), defective)
    r = run("import sys; from core.cli import main; rc = main(['score', '--model', %r, %r]); "
            "loaded = [m for m in %r if m in sys.modules]; print('LOADED', loaded); sys.exit(rc)"
            % (str(model), str(image), LINE_MODULES))
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout and ("part.png," in r.stdout)  # scored, and nothing of the line loaded


def test_serve_without_the_line_extra_says_what_to_install(tmp_path):
    recipe = save_recipe(Recipe("r", []), tmp_path / "r.okrecipe")
    r = run("import sys; sys.modules['pymodbus'] = None; from core.cli import main; "
            f"sys.exit(main(['serve', {str(recipe)!r}, '--images', '.', '--modbus', '5020']))")
    assert r.returncode == 1
    assert "okng: error: the line links need pymodbus: pip install 'okng-station[line]'" in r.stderr


def test_serve_without_a_link_or_with_a_missing_recipe_is_refused_before_any_work(tmp_path, capsys):
    from core.cli import main

    recipe = save_recipe(Recipe("r", []), tmp_path / "r.okrecipe")
    image = tmp_path / "a.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    assert main(["serve", str(recipe), "--images", str(image)]) == 2
    assert "give --opcua and/or --modbus" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.okrecipe"), "--images", str(image), "--modbus", "0"]) == 1
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["serve", str(recipe), "--images", str(image), "--modbus", "127.0.0.1:0"]) == 1
    assert "has no fitted model" in capsys.readouterr().err


def test_serve_names_at_start_every_recipe_that_will_not_load(tmp_path, saved_tiny_model):
    """Found trying the station: a model file given as recipe 2 was only found when the PLC
    switched to it mid-run."""
    from core.line.command import recipe_warnings

    model, _ = saved_tiny_model
    good = save_recipe(Recipe("good", [], {}, str(model)), tmp_path / "good.okrecipe")
    unfitted = save_recipe(Recipe("new", []), tmp_path / "new.okrecipe")
    warnings = recipe_warnings([good, model, unfitted])
    assert len(warnings) == 2
    assert warnings[0].startswith(f"recipe 2 ({model}) will not load: ")
    assert warnings[1] == f"recipe 3 ({unfitted}) has no model file (fit it first)"
