"""Issue 6: a full disk gives one clear error line and leaves the previous output intact.

ENOSPC is simulated in core.atomic's write path (no real disk is filled).
"""
from __future__ import annotations

import errno
import os

import cv2
import numpy as np
import pytest

from core.cli import main
from tests.conftest import make_part


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    rng = np.random.default_rng(0)
    ok, ng = [], []
    for i in range(8):
        cv2.imwrite(str(d / f"ok_{i}.png"), make_part(rng))
        ok.append(str(d / f"ok_{i}.png"))
    for i in range(2):
        cv2.imwrite(str(d / f"ng_{i}.png"), make_part(rng, defect=True))
        ng.append(str(d / f"ng_{i}.png"))
    model = d / "m.okng"
    fit_args = ["fit", *ok, "--out", str(model), "--weights", "random", "--image-size", "64",
                "--channels", "24", "--batch-size", "4"]
    assert main(fit_args) == 0
    return model, ok, ng, fit_args


def _disk_full_at(monkeypatch, where: str):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(where, full)


def _one_clear_line(capsys, target):
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("okng: error: cannot save") and str(target) in last
    assert "disk is full" in last and "previous file is unchanged" in last
    assert "Traceback" not in "\n".join(err)


def _no_temporaries(folder):
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["core.atomic.os.fsync", "core.atomic.os.replace"])
def test_score_csv_on_a_full_disk(station, tmp_path, monkeypatch, capsys, where):
    model, ok, ng, _ = station
    out = tmp_path / "results.csv"
    out.write_text("previous results\n")
    _disk_full_at(monkeypatch, where)
    assert main(["score", "--model", str(model), *ok[:2], "--csv", str(out)]) == 1
    _one_clear_line(capsys, out)
    assert out.read_text() == "previous results\n"
    _no_temporaries(tmp_path)


def test_score_csv_when_the_write_itself_fails(station, tmp_path, monkeypatch, capsys):
    """ENOSPC raised by the csv writer's own file writes (the usual place on a real disk)."""
    import builtins

    model, ok, ng, _ = station
    out = tmp_path / "results.csv"
    out.write_text("previous results\n")
    real_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self._f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return FullFile(f) if (".tmp" in str(file) or str(file).endswith(".partial")) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", fake_open)
    assert main(["score", "--model", str(model), *ok[:2], "--csv", str(out)]) == 1
    monkeypatch.undo()
    _one_clear_line(capsys, out)
    assert out.read_text() == "previous results\n"
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("where", ["core.atomic.os.fsync", "pathlib.Path.write_bytes"])
def test_eval_json_on_a_full_disk(station, tmp_path, monkeypatch, capsys, where):
    model, ok, ng, _ = station
    out = tmp_path / "eval.json"
    out.write_text('{"previous": true}')
    _disk_full_at(monkeypatch, where)
    assert main(["eval", "--model", str(model), "--ok", *ok[:3], "--ng", *ng, "--json", str(out)]) == 1
    monkeypatch.undo()
    _one_clear_line(capsys, out)
    assert out.read_text() == '{"previous": true}'
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("where", ["core.atomic.os.fsync", "core.atomic.os.replace",
                                   "core.atomic.tempfile.mkdtemp"])
def test_fit_out_on_a_full_disk(station, tmp_path, monkeypatch, capsys, where):
    from core.persistence import load_detector

    model, ok, ng, fit_args = station
    out = tmp_path / "model.okng"
    out.write_bytes(model.read_bytes())
    args = list(fit_args)
    args[args.index("--out") + 1] = str(out)
    _disk_full_at(monkeypatch, where)
    assert main(args) == 1
    monkeypatch.undo()
    _one_clear_line(capsys, out)
    assert out.read_bytes() == model.read_bytes()
    load_detector(out)
    _no_temporaries(tmp_path)


# -- a real full disk (issue 13): a 2 MB tmpfs, filled up ----------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs mounted at tmp_path/disk (root only), unmounted afterwards."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the faked ENOSPC tests above still run)")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(folder, leave: int) -> None:
    """Fill the file system of ``folder`` until only ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_fit_out_on_a_really_full_disk(station, small_disk, capsys):
    """safetensors raises SafetensorError ('No space left on device'), not OSError: the
    station's writer must still give the one clear line and keep the previous model."""
    from core.persistence import load_detector

    model, ok, ng, fit_args = station
    out = small_disk / "model.okng"
    out.write_bytes(model.read_bytes())
    _fill(small_disk, leave=64 * 1024)  # the model is ~300 kB
    args = list(fit_args)
    args[args.index("--out") + 1] = str(out)
    capsys.readouterr()
    assert main(args) == 1
    _one_clear_line(capsys, out)
    assert out.read_bytes() == model.read_bytes()
    load_detector(out)
    _no_temporaries(small_disk)


def test_safetensors_own_writer_on_a_really_full_disk_is_a_clean_save_error(small_disk):
    """The exception the library really raises, caught by core.atomic."""
    import torch
    from safetensors.torch import save_file

    from core.atomic import SaveError, write_atomic

    target = small_disk / "t.safetensors"
    target.write_bytes(b"previous")
    _fill(small_disk, leave=16 * 1024)
    with pytest.raises(SaveError, match="the disk is full; the previous file is unchanged"):
        write_atomic(target, lambda tmp: save_file({"a": torch.zeros(200_000)}, str(tmp)))
    assert target.read_bytes() == b"previous"
    _no_temporaries(small_disk)


def test_a_failed_save_of_a_new_file_says_nothing_was_written(tmp_path, monkeypatch):
    """Only a save over a file keeps "the previous file"; a new one leaves nothing."""
    from core.atomic import SaveError, write_bytes_atomic

    _disk_full_at(monkeypatch, "core.atomic.os.fsync")
    with pytest.raises(SaveError, match="the disk is full; nothing was written"):
        write_bytes_atomic(tmp_path / "new.json", b"{}")
    (tmp_path / "old.json").write_bytes(b"old")
    with pytest.raises(SaveError, match="the disk is full; the previous file is unchanged"):
        write_bytes_atomic(tmp_path / "old.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    real_lstat = os.lstat
    monkeypatch.setattr("core.atomic.os.lstat", lambda p, *a, **k: (
        (_ for _ in ()).throw(PermissionError(13, "Permission denied")) if str(p).endswith("x.json")
        else real_lstat(p, *a, **k)))
    with pytest.raises(SaveError, match="the previous file, if any, is unchanged"):  # still a SaveError
        write_bytes_atomic(tmp_path / "x.json", b"{}")


def test_score_csv_on_a_really_full_disk(station, small_disk, capsys):
    model, ok, ng, _ = station
    out = small_disk / "results.csv"
    out.write_text("previous results\n")
    _fill(small_disk, leave=0)
    assert main(["score", "--model", str(model), *ok[:2], "--csv", str(out)]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err
    assert out.read_text() == "previous results\n"
