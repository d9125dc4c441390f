"""Crash-safe file writes: temporary file in the same folder, fsync, rename, fsync folder.

A reader sees either the old file or the new one, never a half-written file, whatever
happens in between (kill, power loss, disk full). A failed write removes its temporary
file and leaves the previous file untouched.

A full disk is recognised whether the writer raises ``OSError(ENOSPC)`` or a library's own
exception carrying the OS message (safetensors raises ``SafetensorError: ... No space left
on device (os error 28)``). The file gets the permissions an ordinary ``open()`` would give
(0666 minus the umask), or keeps those of the file it replaces.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OkngError


class SaveError(OkngError):
    """A file could not be written; the previous version is intact."""


_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or a library error whose message carries it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(exc) for t in _DISK_FULL_TEXT)


def describe_error(exc: BaseException) -> str:
    if is_disk_full(exc):
        return "the disk is full"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{exc.__class__.__name__}: {str(exc)[:200]}"


_umask_lock = threading.Lock()


def current_umask() -> int:
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode(target: Path) -> int:
    """The mode ``open(target, "w")`` would give: the replaced file's, or 0666 & ~umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def _kept(target: Path) -> str:
    """What a failed save left: the file that was there, or nothing (a new file). Never
    raises (a folder we may not read says neither)."""
    try:
        os.lstat(target)
    except FileNotFoundError:
        return "nothing was written"
    except OSError:
        return "the previous file, if any, is unchanged"
    return "the previous file is unchanged"


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
        raise SaveError(f"cannot save {target}: {describe_error(exc)}; {_kept(target)}") from exc
    tmp = tmp_dir / target.name
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
        _fsync_dir(folder)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _remove_stale_temps(folder, target.name)
    except SaveError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise SaveError(f"cannot save {target}: {describe_error(exc)}; {_kept(target)}") from exc
        raise
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


#: suffix of a file written progressively (``okng score --csv``): kept if the run stops
PARTIAL_SUFFIX = ".partial"


class PartialFile:
    """Write ``target`` progressively through ``<target>.partial``, renamed over ``target``
    by :meth:`commit` (fsync, rename, fsync folder: atomic like :func:`atomic_path`).

    Until then ``target`` keeps the previous run's content. A run that is killed or
    interrupted leaves ``<target>.partial`` behind with every row written so far (each
    :meth:`write` is flushed to the OS, so a ``SIGKILL`` loses nothing already written): its
    name says the run did not finish, and the older ``target`` is not this run's result.
    A failed write (disk full) removes the partial file and raises :class:`SaveError`.
    """

    def __init__(self, target: str | os.PathLike[str], encoding: str = "utf-8") -> None:
        self.target = Path(target)
        folder = self.target.parent if str(self.target.parent) else Path(".")
        if not folder.is_dir():
            raise SaveError(f"cannot save {self.target}: folder {folder} does not exist")
        if self.target.is_dir():
            raise SaveError(f"cannot save {self.target}: it is a folder")
        self.folder = folder
        self.path = self.target.with_name(self.target.name + PARTIAL_SUFFIX)
        try:
            self._f = open(self.path, "w", newline="", encoding=encoding)
        except OSError as exc:
            raise SaveError(f"cannot save {self.target}: {describe_error(exc)}; {_kept(self.target)}") from exc

    @property
    def closed(self) -> bool:
        return self._f.closed

    def _fail(self, exc: BaseException) -> SaveError:
        self.discard()
        return SaveError(f"cannot save {self.target}: {describe_error(exc)}; {_kept(self.target)}")

    def write(self, text: str) -> None:
        try:
            self._f.write(text)
            self._f.flush()
        except OSError as exc:
            raise self._fail(exc) from exc

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self.path, _file_mode(self.target))
            os.replace(self.path, self.target)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise self._fail(exc) from exc

    def keep(self) -> None:
        """Close, leaving ``<target>.partial`` as the record of an unfinished run."""
        try:
            self._f.close()
        except OSError:
            pass

    def discard(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        try:
            self.path.unlink()
        except OSError:
            pass
