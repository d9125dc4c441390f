"""Issue 13: ``okng score`` streams its rows, heatmaps are never lost silently, CSV cells
cannot become formulas, exit codes; small CLI faults (empty folder, model folder, paths)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.cli import csv_safe, heatmap_name, main
from tests.conftest import make_part

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())


@pytest.fixture(scope="module")
def model(saved_tiny_model):
    return saved_tiny_model[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        p = d / f"part_{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    return paths


def okng(*args, **kw):
    """``okng ARGS`` in a child process, with Ctrl-C (SIGINT) as an operator's terminal has it:
    a suite started in the background by a script inherits SIGINT ignored, and so would the
    child (seen under mutmut: the Ctrl-C test then failed)."""
    return subprocess.Popen([sys.executable, "-m", "core.cli", *args], env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


# -- heatmaps -------------------------------------------------------------------------------
def test_an_image_name_too_long_for_a_heatmap_name_gets_a_shortened_unique_heatmap(model, images, tmp_path, capsys):
    long_a = tmp_path / ("é" * 60 + "a" * 100 + "_A.png")  # 226 bytes: fine as an image name
    long_b = tmp_path / ("é" * 60 + "a" * 100 + "_B.png")
    for p in (long_a, long_b):
        p.write_bytes(Path(images[0]).read_bytes())
    maps = tmp_path / "maps"
    assert main(["score", "--model", str(model), str(long_a), str(long_b), images[1], "--heatmaps", str(maps)]) == 0
    names = sorted(p.name for p in maps.iterdir())
    assert len(names) == 3 and len(set(names)) == 3
    assert all(len(n.encode()) <= 255 for n in names)
    assert names[0].startswith("00000_é") and names[1].startswith("00001_é")
    assert all((maps / n).stat().st_size > 0 for n in names)


def test_heatmap_name_is_cut_on_a_character_boundary_and_keeps_the_row():
    for stem in ("x" * 300, "é" * 200, "日本" * 100, "a" * 246):
        n = heatmap_name(12345, f"/some/{stem}.png")
        assert len(n.encode("utf-8")) <= 255 and n.startswith("12345_") and n.endswith(".png")
        n.encode("utf-8").decode("utf-8")  # valid UTF-8
    assert heatmap_name(7, "/a/short.png") == "00007_short.png"
    assert heatmap_name(0, "/" + "x" * 300 + "1.png") != heatmap_name(0, "/" + "x" * 300 + "2.png")


def test_heatmaps_naming_an_existing_file_is_a_clear_error(model, images, tmp_path, capsys):
    f = tmp_path / "maps"
    f.write_text("a file")
    assert main(["score", "--model", str(model), images[0], "--heatmaps", str(f)]) == 1
    err = capsys.readouterr().err
    assert "okng: error: --heatmaps" in err and "Traceback" not in err


def test_a_failed_heatmap_write_is_an_error_not_an_empty_file(model, images, tmp_path, capsys, monkeypatch):
    """cv2.imwrite's False was ignored: zero-byte files and exit 0 on a nearly full disk."""
    import builtins
    import errno

    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if str(file).endswith(".png") and "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    maps = tmp_path / "maps"
    monkeypatch.setattr(builtins, "open", full_open)
    assert main(["score", "--model", str(model), *images, "--heatmaps", str(maps)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "cannot save heatmap" in err and "disk is full" in err and "Traceback" not in err
    assert [p for p in maps.iterdir() if p.stat().st_size == 0] == []


def test_heatmaps_on_a_really_full_disk(model, images, small_disk, capsys):
    maps = small_disk / "maps"
    maps.mkdir()
    st = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    assert main(["score", "--model", str(model), *images, "--heatmaps", str(maps)]) == 1
    err = capsys.readouterr().err
    assert "cannot save heatmap" in err and "disk is full" in err and "Traceback" not in err
    assert [p for p in maps.iterdir() if p.stat().st_size == 0] == []


@pytest.fixture
def small_disk(tmp_path):
    import shutil

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def read_only_folder(small_disk):
    """A real folder nobody may write in (a read-only share): the small tmpfs, filled while
    writable, then ``seal()``-ed read-only."""
    yield small_disk, lambda: subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)


def test_outputs_in_a_read_only_folder_are_refused_before_the_work(model, images, read_only_folder, capsys,
                                                                   monkeypatch):
    """A fit, an evaluation or a simulation of minutes must not end in "cannot save" (and an
    export not in a traceback): an output folder that takes no file is refused first."""
    import core.evaluation
    import core.jobs
    import core.simulate

    share, seal = read_only_folder
    seal()
    monkeypatch.setattr(core.jobs, "fit_job", lambda *a, **k: pytest.fail("fitted before checking --out"))
    monkeypatch.setattr(core.evaluation, "evaluate_job", lambda *a, **k: pytest.fail("evaluated first"))
    monkeypatch.setattr(core.simulate, "simulate_feedback_job", lambda *a, **k: pytest.fail("simulated first"))
    for argv in (["fit", *images, "--out", str(share / "m.okng")],
                 ["eval", "--model", str(model), "--ok", *images, "--ng", images[0], "--json", str(share / "e.json")],
                 ["simulate-feedback", "--model", str(model), "--pool", *images, "--ok", *images, "--ng", images[0],
                  "--json", str(share / "s.json")],
                 ["export", str(model), "--out", str(share / "bundle")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write in" in err and "nothing was done" in err, err
    assert list(share.iterdir()) == []


def test_a_recipe_on_a_read_only_share_opens(read_only_folder):
    """A recipe (SQLite in WAL mode) copied to a read-only share: SQLite cannot make its
    "-shm" file there; the recipe is read as the file stands."""
    from core.recipes import Recipe, load_recipe, save_recipe

    share, seal = read_only_folder
    save_recipe(Recipe("cells", ["x.png"], {}, image_threshold=4.5), share / "cells.okrecipe")
    seal()
    loaded = load_recipe(share / "cells.okrecipe")
    assert (loaded.name, loaded.ok_paths, loaded.image_threshold) == ("cells", ["x.png"], 4.5)


def test_the_output_check_writes_where_the_save_will(read_only_folder, tmp_path):
    """A save writes beside the name it is given (a link there is replaced, not followed):
    the check probes that folder, not the one a link points into."""
    from core.cli import _check_output
    from core.errors import OkngError

    share, seal = read_only_folder
    (tmp_path / "to-share.okng").symlink_to(share / "m.okng")
    (share / "to-tmp.okng").symlink_to(tmp_path / "m.okng")
    seal()
    _check_output(str(tmp_path / "to-share.okng"), "--out")  # its own folder takes files
    with pytest.raises(OkngError, match="cannot write in"):
        _check_output(str(share / "to-tmp.okng"), "--out")


def test_json_is_written_even_when_the_reader_of_the_figures_left(model, images, tmp_path, monkeypatch):
    """`okng eval … --json F | head`: the pipe closes while the figures are printed; the
    JSON file is still written and the exit is 0."""
    sink = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT)  # where main() points stdout after

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "e.json"
    try:
        assert main(["eval", "--model", str(model), "--ok", *images, "--ng", images[0], "--json", str(out)]) == 0
    finally:
        os.close(sink)
    assert "image_auroc" in out.read_text()


def test_an_os_error_no_command_foresaw_is_one_line(model, tmp_path, capsys, monkeypatch):
    import core.bundle

    def cannot(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "b"))

    monkeypatch.setattr(core.bundle, "export_bundle", cannot)
    assert main(["export", str(model), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err == f"okng: error: Permission denied: {tmp_path / 'b'}\n"


# -- CSV cells that would be formulas -------------------------------------------------------
@pytest.mark.parametrize("name", ["=HYPERLINK(x).png", "+1.png", "-2.png", "@SUM.png"])
def test_file_names_that_look_like_formulas_are_neutralised(model, images, tmp_path, name):
    p = tmp_path / name
    p.write_bytes(Path(images[0]).read_bytes())
    out = tmp_path / "r.csv"
    assert main(["score", "--model", str(model), str(p), "--csv", str(out)]) == 0
    row = next(csv.DictReader(out.open(encoding="utf-8")))
    assert row["path"] == "'" + str(p) if str(p)[0] in "=+-@" else row["path"] == str(p)
    assert csv_safe(name) == "'" + name


def test_csv_safe_leaves_ordinary_text_alone():
    assert csv_safe("/data/a.png") == "/data/a.png"
    assert csv_safe("") == ""
    assert csv_safe("\t=1") == "'\t=1"


# -- streaming rows; a killed run --------------------------------------------------------------
N_STREAM = 1500


def _wait_rows(path: Path, n: int, proc, timeout: float = 120.0) -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if path.exists() and path.read_text(encoding="utf-8", errors="replace").count("\n") >= n + 1:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before any row was seen (exit {proc.returncode})")
        time.sleep(0.01)
    pytest.fail("no rows appeared")


def test_sigkill_during_score_keeps_the_rows_in_a_partial_file(model, images, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("previous run\n")
    proc = okng("score", "--model", str(model), *([images[0]] * N_STREAM), "--csv", str(out),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "results.csv.partial"
    try:
        _wait_rows(partial, 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_text() == "previous run\n"  # untouched: not this run's result
    rows = list(csv.DictReader(partial.open(encoding="utf-8")))
    assert 3 <= len(rows) < N_STREAM
    assert all(r["verdict"] in ("OK", "NG") and float(r["score"]) >= 0 for r in rows[:-1])


def test_rows_reach_stdout_as_they_are_scored(model, images, tmp_path):
    sink = tmp_path / "stdout.csv"
    with open(sink, "wb") as f:
        proc = okng("score", "--model", str(model), *([images[0]] * N_STREAM), stdout=f, stderr=subprocess.DEVNULL)
        try:
            _wait_rows(sink, 3, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    rows = list(csv.DictReader(sink.open(encoding="utf-8")))
    assert 3 <= len(rows) < N_STREAM


def test_a_complete_run_renames_the_partial_file(model, images, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("previous run\n")
    assert main(["score", "--model", str(model), *images, "--csv", str(out)]) == 0
    assert not (tmp_path / "results.csv.partial").exists()
    assert [r["path"] for r in csv.DictReader(out.open())] == images


# -- exit codes -------------------------------------------------------------------------------
def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_an_invalid_setting_exits_2_with_one_line(tmp_path, images, capsys):
    assert main(["fit", *images, "--out", str(tmp_path / "m.okng"), "--weights", "random", "--sigma", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("okng: error:") and "sigma" in err and "Traceback" not in err


def test_ctrl_c_exits_130_and_keeps_the_partial_csv(model, images, tmp_path):
    out = tmp_path / "results.csv"
    proc = okng("score", "--model", str(model), *([images[0]] * N_STREAM), "--csv", str(out),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(tmp_path / "results.csv.partial", 2, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "okng: interrupted" in err and "Traceback" not in err
    assert "results.csv.partial" in err and (tmp_path / "results.csv.partial").exists()
    assert not out.exists()


def test_a_closed_pipe_exits_0_without_a_traceback(model, images):
    proc = okng("score", "--model", str(model), *([images[0]] * 400), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(120)
    assert first.startswith(b"path,")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


# -- small faults -----------------------------------------------------------------------------
def test_an_empty_folder_among_the_inputs_is_reported(model, images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", "--model", str(model), images[0], str(empty)]) == 0
    err = capsys.readouterr().err
    assert f"no images found in folder {empty}" in err


def test_a_model_that_is_a_folder_is_named_as_such(tmp_path, images, capsys):
    assert main(["score", "--model", str(tmp_path), images[0]]) == 1
    err = capsys.readouterr().err
    assert "is a folder, not a model file" in err and "not found" not in err


def test_a_relative_weights_path_is_stored_resolved(tmp_path, images, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from core.backbone import DEFAULT_BACKBONE
    from core.persistence import read_model_file

    net = timm.create_model(DEFAULT_BACKBONE, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *images, "--out", "m.okng", "--weights", "w.safetensors", "--image-size", "64",
                 "--channels", "24"]) == 0
    meta, _ = read_model_file(tmp_path / "m.okng")
    assert meta["config"]["weights"] == str((tmp_path / "w.safetensors").resolve())


def test_model_and_csv_files_honour_the_umask(model, images, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "r.csv"
        assert main(["score", "--model", str(model), images[0], "--csv", str(out)]) == 0
        from core import load_detector, save_detector

        m = save_detector(load_detector(model), tmp_path / "m.okng")
        assert out.stat().st_mode & 0o777 == 0o644
        assert m.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        m2 = save_detector(load_detector(model), tmp_path / "m2.okng")
        assert m2.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_only_empty_folders_give_one_error_not_a_warning_and_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", str(empty), "--out", str(tmp_path / "m.okng")]) == 1
    err = capsys.readouterr().err
    assert err == f"okng: error: no images found in {empty}\n"
