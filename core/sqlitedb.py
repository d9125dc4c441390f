"""SQLite access shared by the labels store and recipes: safe when processes race.

SQLite's busy timeout does not cover every contention: switching a new file to WAL, or
upgrading a read transaction to a write one while another process writes, returns
``database is locked`` at once. :func:`retry_busy` retries those within a deadline, and
:func:`write_transaction` takes the write lock up front (``BEGIN IMMEDIATE``), so a
check-then-insert cannot interleave with another process's (``UNIQUE constraint failed``).
"""
from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

#: seconds a store waits for another process before giving up
BUSY_TIMEOUT = 10.0


def is_busy(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def retry_busy(fn: Callable[[], T], timeout: float = BUSY_TIMEOUT) -> T:
    """Call ``fn`` until it does not fail with SQLITE_BUSY/LOCKED, for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)


def connect(path: str, timeout: float = BUSY_TIMEOUT, uri: bool = False) -> sqlite3.Connection:
    """Autocommit connection (transactions explicit) with a busy timeout."""
    return sqlite3.connect(path, timeout=timeout, isolation_level=None, uri=uri)


def read_only_uri(path: str | os.PathLike[str], immutable: bool = False) -> str:
    """A SQLite URI opening ``path`` read-only (``connect(..., uri=True)``): every character
    SQLite would read as URI syntax ('?', '#', '%', spaces, non-ASCII) percent-encoded, a
    Windows drive or UNC share written as SQLite expects (``file:///C:/...``,
    ``file:////server/share/...``). A file that does not exist is an error, never created.
    ``immutable``: read it as a file nothing changes (no locks, no ``-shm`` file: see
    :func:`wal_beside_is_empty`)."""
    p = os.path.abspath(os.fspath(path)).replace(os.sep, "/")
    if not p.startswith("/"):
        p = "/" + p  # C:/... -> /C:/...
    return f"file://{urllib.parse.quote(p, safe='/:')}?mode=ro" + ("&immutable=1" if immutable else "")


def wal_beside_is_empty(path: str | os.PathLike[str]) -> bool:
    """True when the database at ``path`` has no write-ahead log with content beside it: all
    it holds is in the file itself, so it can be read as immutable. (A WAL-mode database
    opened read-only needs its ``-shm`` file, which SQLite cannot create in a folder it may
    not write: a read-only share, a copied-out recipe, another user's folder.)"""
    try:
        return os.path.getsize(os.fspath(path) + "-wal") == 0
    except FileNotFoundError:
        return True


def enable_wal(con: sqlite3.Connection) -> None:
    retry_busy(lambda: con.execute("PRAGMA journal_mode=WAL").fetchone())


def checkpoint(con: sqlite3.Connection) -> None:
    """Fold the write-ahead log into the database file and empty it: after a save, the file
    alone holds everything (found trying the station: a recipe folder copied while the
    station ran had its labels only in the ``-wal`` file, and the copy came without them).
    A busy database keeps its log until the next checkpoint; nothing is lost either way."""
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        log.info("checkpoint skipped: %s", exc)


def write_transaction(con: sqlite3.Connection, body: Callable[[sqlite3.Connection], T],
                      timeout: float = BUSY_TIMEOUT) -> T:
    """Run ``body(con)`` in one ``BEGIN IMMEDIATE`` transaction, retried whole if busy."""

    def attempt() -> T:
        con.execute("BEGIN IMMEDIATE")
        try:
            result = body(con)
            con.execute("COMMIT")
            return result
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    return retry_busy(attempt, timeout)


def backup_to(con: sqlite3.Connection, target: str | os.PathLike[str]) -> None:
    """Copy a whole database, consistently, to a new file (SQLite's online backup)."""
    dst = sqlite3.connect(str(target))
    try:
        con.backup(dst)
    finally:
        dst.close()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """One file under two spellings (relative and absolute, through a link)? Paths that do
    not exist yet compare resolved."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return os.fspath(a) == os.fspath(b)


def aside_name(target: str | os.PathLike[str]) -> str:
    """A free ``<target>.replaced-<time>[-n]`` name for the database a copy replaces."""
    target = os.fspath(target)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = f"{target}.replaced-{stamp}", 1
    while os.path.exists(aside) or os.path.exists(aside + ".part"):
        n += 1
        aside = f"{target}.replaced-{stamp}-{n}"
    return aside


def copy_over(con: sqlite3.Connection, target: str | os.PathLike[str], aside: str | None = None) -> str | None:
    """Copy a whole database to ``target``, where a database may already be (saving a recipe
    over another one). An existing one is first copied whole, its WAL content included, to
    ``<target>.replaced-<time>`` (returned; None when there was none), then overwritten in
    place by SQLite's backup, one locked transaction: no file is renamed, so a crash leaves
    the old or the new content, never neither, and another station that has it open reads
    the new content rather than writing on into a moved file. A new target is written beside
    it and renamed into place. ``aside``: the name to set the existing one aside under (a
    save's journal names it before the copy); it appears only once whole (written as
    ``<aside>.part`` and renamed), so a copy aside that exists can always be put back."""
    target = os.fspath(target)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)  # as the recipe's own save does
        part = f"{target}.part-{os.getpid()}"
        _remove_database(part)
        try:
            backup_to(con, part)
            os.replace(part, target)
        except BaseException:
            _remove_quietly(part)  # e.g. a full disk: no half copy left to fill it further
            raise
        return None
    aside = aside or aside_name(target)
    part = f"{aside}.part"
    dst = connect(target)
    try:
        backup_to(dst, part)
        os.replace(part, aside)
        retry_busy(lambda: con.backup(dst))
    except BaseException:
        _remove_quietly(part)
        _remove_quietly(aside)  # the target is unchanged (the backup is one transaction)
        raise
    finally:
        dst.close()
    return aside


def put_back(target: str | os.PathLike[str], aside: str | None) -> None:
    """Undo :func:`copy_over` (a save that stopped after it): the content it set ``aside``
    goes back into ``target`` the same way, in place, and the copy aside is removed; a
    target it created (``aside`` None) is removed."""
    target = os.fspath(target)
    if aside is None:
        _remove_database(target)
        return
    # read-only: a copy aside that has gone must fail here, not be created empty and copied in
    src = sqlite3.connect(read_only_uri(aside), uri=True)
    try:
        dst = connect(target)
        try:
            retry_busy(lambda: src.backup(dst))
        finally:
            dst.close()
    finally:
        src.close()
    _remove_database(aside)


def remove_partial(aside: str | None) -> None:
    """The unfinished ``<aside>.part`` a stopped :func:`copy_over` may have left."""
    if aside is not None:
        _remove_database(f"{aside}.part")


def _remove_database(path: str) -> None:
    """A database file and the WAL files SQLite may leave beside it (even a reader does)."""
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(name):
            os.remove(name)


def _remove_quietly(path: str) -> None:
    """:func:`_remove_database` while another error is being raised (that one is the news)."""
    try:
        _remove_database(path)
    except OSError:
        pass
