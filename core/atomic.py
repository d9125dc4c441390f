"""Crash-safe file writes: temporary file in the same folder, fsync, rename, fsync folder.

A reader sees either the old file or the new one, never a half-written file, whatever
happens in between (kill, power loss, disk full). A failed write removes its temporary
file and leaves the previous file untouched.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OkngError


class SaveError(OkngError):
    """A file could not be written; the previous version is intact."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path (in a hidden folder next to ``target``); on success it replaces ``target``."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SaveError(f"cannot save {target}: folder {folder} does not exist")
    # A private hidden folder per save: the temporary file, and any temporary file the
    # writer itself makes next to it (safetensors writes its own ``.tmpXXXXXX`` and renames
    # it), stay inside it, so a writer killed mid-save leaves only ``.NAME.XXXX.tmp/``.
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:  # read-only folder, no permission, disk full
        reason = "the disk is full" if exc.errno == 28 else (exc.strerror or str(exc))
        raise SaveError(f"cannot save {target}: {reason}; the previous file is unchanged") from exc
    tmp = tmp_dir / target.name
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _remove_stale_temps(folder, target.name)
    except OSError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        reason = "the disk is full" if exc.errno == 28 else (exc.strerror or str(exc))
        raise SaveError(f"cannot save {target}: {reason}; the previous file is unchanged") from exc
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


#: A temporary file this old was left by a killed writer (a live save takes seconds at most).
STALE_TEMP_SECONDS = 600.0


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temporary files of ``name`` left by a writer that was killed mid-save.

    They are named ``.NAME.XXXX.tmp`` (hidden, never ``*.okng``/``*.csv``), so nothing
    mistakes them for the real file; this only reclaims their disk space. Young ones are
    kept: they may belong to another process saving the same file right now.
    """
    limit = time.time() - STALE_TEMP_SECONDS
    try:
        for p in folder.glob(f".{glob.escape(name)}.*.tmp"):
            try:
                if p.stat().st_mtime < limit:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(target: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result over ``target`` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    write_atomic(target, lambda p: p.write_bytes(data))
