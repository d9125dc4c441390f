"""The results log: every inspection of a recipe, in SQLite beside it.

One row per inspected image (time, image path and content hash, score, verdict, thresholds,
model identity, operator, ground truth when known, the path of a kept copy of an NG image).
Shift counters (total, OK, NG, yield, parts per minute) are queries over the rows since the
last reset, so they survive a restart and never drift from the log. Retention limits (rows,
days) prune the oldest rows.

Durability: WAL with ``synchronous=NORMAL``: a committed row survives a crash or kill of the
station (it is in the OS's hands); a power cut may lose the last second. Labels, which an
operator saw acknowledged, use ``FULL`` (:mod:`core.labels`).

Example:
    >>> log = ResultsLog("cells.results.sqlite")
    >>> log.add(LogEntry(time.time(), "p.png", sha, 12.5, "NG", 10.0, 20.0, "cells.okng@...", "ana"))
    >>> log.counters().yield_rate
"""
from __future__ import annotations

import csv
import io
import sqlite3
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from . import sqlitedb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    score REAL,
    verdict TEXT NOT NULL,          -- OK | NG | ? (no threshold: never counted as OK) | ERROR
    image_threshold REAL,
    pixel_threshold REAL,
    model_id TEXT NOT NULL,
    operator TEXT NOT NULL,
    truth TEXT,                     -- OK | NG when known (folders named ok/ng, the demo), else NULL
    ng_copy TEXT                    -- path of the kept copy of an NG image, or NULL
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections (time);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"
_OK_NAMES = {"ok", "good", "pass", "normal"}
_NG_NAMES = {"ng", "bad", "fail", "defect", "defective", "nok"}


def truth_from_path(path: str | None) -> str | None:
    """Ground truth from the nearest folder named like ``ok``/``good`` or ``ng``/``bad``."""
    if not path:
        return None
    for part in reversed(Path(path).parent.parts):
        name = part.lower()
        if name in _OK_NAMES:
            return "OK"
        if name in _NG_NAMES:
            return "NG"
    return None


@dataclass(frozen=True)
class LogEntry:
    time: float
    image_path: str
    image_sha256: str
    score: float | None
    verdict: str
    image_threshold: float | None
    pixel_threshold: float | None
    model_id: str
    operator: str
    truth: str | None = None
    ng_copy: str | None = None
    id: int | None = None


@dataclass(frozen=True)
class Counters:
    """Shift counters since ``since`` (epoch seconds)."""

    since: float
    total: int
    ok: int
    ng: int
    unjudged: int  # no threshold yet: neither OK nor NG
    first: float | None
    last: float | None
    #: when the truth is known: (truth, verdict) -> count, e.g. ("NG", "OK") = missed defects
    confusion: dict[tuple[str, str], int]
    #: parts with no verdict because the cycle failed (no image in time, an unreadable image,
    #: the inspection failed): not in ``total``, but parts the line sent on without a verdict
    errors: int = 0

    @property
    def yield_rate(self) -> float | None:
        judged = self.ok + self.ng
        return self.ok / judged if judged else None

    @property
    def parts_per_minute(self) -> float | None:
        """Parts per minute from the shift's start to its last part (a batch inspected in a
        second gave 7,710 / min when counted from its first part to its last)."""
        if self.last is None or self.total < 1 or self.last <= self.since:
            return None
        return self.total / (self.last - self.since) * 60.0

    def rates(self) -> dict[str, float | None]:
        """Detection and false-alarm rate on the parts whose truth is known."""
        c = self.confusion
        ng = c.get(("NG", "NG"), 0) + c.get(("NG", "OK"), 0)
        ok = c.get(("OK", "OK"), 0) + c.get(("OK", "NG"), 0)
        return {"detection_rate": c.get(("NG", "NG"), 0) / ng if ng else None,
                "false_alarm_rate": c.get(("OK", "NG"), 0) / ok if ok else None}


class ResultsLog:
    """SQLite-backed inspection log. One connection; used from the session's thread."""

    def __init__(self, path: str | Path, max_rows: int | None = None, max_age_days: float | None = None,
                 shared: bool = False) -> None:
        """``shared``: the caller uses the log from several threads, one at a time (its own lock)."""
        self.path = Path(path)
        self.max_rows, self.max_age_days = max_rows, max_age_days
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0, check_same_thread=not shared)
        self._db.execute("PRAGMA busy_timeout=10000")
        # switching a new file to WAL while another process creates it too fails at once
        # ("database is locked"; the busy timeout does not cover it): retried, as the schema
        sqlitedb.enable_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        sqlitedb.retry_busy(lambda: self._db.executescript(_SCHEMA))  # CREATE ... IF NOT EXISTS: idempotent

        def meta(con: sqlite3.Connection) -> None:
            # INSERT OR IGNORE, not check-then-insert: two stations creating the log at once
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('shift_start', ?)", (repr(time.time()),))

        sqlitedb.write_transaction(self._db, meta)
        (version,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: results log schema {version} is not supported (expected {SCHEMA_VERSION})")
        self._added = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------
    def add(self, e: LogEntry, also: Callable[[sqlite3.Connection, int], None] | None = None) -> int:
        """Log one inspection; ``also(connection, row id)`` writes in the same transaction
        (the line's part id and ack state, :mod:`core.line.store`): both or neither."""
        def insert(con: sqlite3.Connection) -> int:
            cur = con.execute(
                "INSERT INTO inspections (time, image_path, image_sha256, score, verdict, image_threshold, "
                "pixel_threshold, model_id, operator, truth, ng_copy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                astuple(e)[:-1])
            if also is not None:
                also(con, int(cur.lastrowid))
            return int(cur.lastrowid)

        rowid = insert(self._db) if also is None else sqlitedb.write_transaction(self._db, insert)
        self._added += 1
        if self._added % 100 == 1:  # retention: cheap enough to check now and then, not per row
            self.prune()
        return rowid

    def prune(self, now: float | None = None) -> int:
        """Apply the retention limits; returns how many rows were removed."""
        removed = 0
        with self._db:
            if self.max_age_days is not None:
                cutoff = (time.time() if now is None else now) - self.max_age_days * 86400.0
                removed += self._db.execute("DELETE FROM inspections WHERE time < ?", (cutoff,)).rowcount
            if self.max_rows is not None:
                removed += self._db.execute(
                    "DELETE FROM inspections WHERE id <= (SELECT id FROM inspections ORDER BY id DESC "
                    "LIMIT 1 OFFSET ?)", (int(self.max_rows),)).rowcount
        return removed

    def reset_counters(self, now: float | None = None) -> None:
        """Start a new shift: counters count from now (the log keeps every row)."""
        with self._db:
            start = time.time() if now is None else now
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('shift_start', ?)", (repr(start),))

    def backup_to(self, target: str | Path) -> None:
        """Copy the whole log, consistently, to a new file."""
        sqlitedb.backup_to(self._db, target)

    def checkpoint(self) -> None:
        """Everything into the database file itself (:func:`core.sqlitedb.checkpoint`)."""
        sqlitedb.checkpoint(self._db)

    def copy_over(self, target: str | Path) -> str | None:
        """Copy the whole log to ``target``, an existing log there set aside
        (:func:`core.sqlitedb.copy_over`; returns where, or None)."""
        return sqlitedb.copy_over(self._db, target)

    # -- reading --------------------------------------------------------------------------
    @property
    def shift_start(self) -> float:
        (value,) = self._db.execute("SELECT value FROM meta WHERE key='shift_start'").fetchone()
        return float(value)

    def counters(self, since: float | None = None) -> Counters:
        since = self.shift_start if since is None else since
        rows = self._db.execute("SELECT verdict, COUNT(*), MIN(time), MAX(time) FROM inspections "
                                "WHERE time >= ? GROUP BY verdict", (since,)).fetchall()
        errors = sum(n for v, n, _, _ in rows if v == "ERROR")
        rows = [r for r in rows if r[0] != "ERROR"]
        by = {v: n for v, n, _, _ in rows}
        firsts = [t for _, _, t, _ in rows if t is not None]
        lasts = [t for _, _, _, t in rows if t is not None]
        confusion = {(t, v): n for t, v, n in self._db.execute(
            "SELECT truth, verdict, COUNT(*) FROM inspections WHERE time >= ? AND truth IS NOT NULL "
            "AND verdict IN ('OK', 'NG') GROUP BY truth, verdict", (since,))}
        return Counters(since, sum(by.values()), by.get("OK", 0), by.get("NG", 0), by.get("?", 0),
                        min(firsts) if firsts else None, max(lasts) if lasts else None, confusion, errors)

    def entries(self, ng_only: bool = False, since: float | None = None, limit: int | None = 1000) -> list[LogEntry]:
        """Newest first."""
        sql = "SELECT * FROM inspections WHERE time >= ?" + (" AND verdict = 'NG'" if ng_only else "")
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._entry(r) for r in self._db.execute(sql, (since or 0.0,))]

    @staticmethod
    def _entry(row: tuple) -> LogEntry:
        (rid, t, path, sha, score, verdict, ith, pth, model, op, truth, copy) = row
        return LogEntry(t, path, sha, score, verdict, ith, pth, model, op, truth, copy, rid)

    def export_csv(self, ng_only: bool = False, since: float | None = None) -> str:
        """The log as CSV text, oldest first, ISO times (cells that a spreadsheet would run as
        a formula are prefixed with a quote)."""
        out = io.StringIO()
        w = csv.writer(out)
        names = [f.name for f in fields(LogEntry)]
        w.writerow(["iso_time", *names, *LINE_COLUMNS])
        for row in self._export_rows(ng_only, since):
            e = self._entry(row[:12])
            acked = row[15]
            line = ("", "", "", "") if row[12] is None else (
                row[12], row[13], row[14], "" if acked is None else time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                                  time.localtime(acked)))
            iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e.time))
            w.writerow([iso, *(_cell(v) for v in astuple(e)), *(_cell(v) for v in line)])
        return out.getvalue()

    def _export_rows(self, ng_only: bool, since: float | None):
        """The export's rows, oldest first, streamed: each inspection with the part id, error
        code and text and acknowledgement time of its line cycle (``core.line.store`` writes
        them beside the inspections; NULL for the window's own inspections and in a log never
        served). Found on a night shift: the export left out which physical part an error row
        was and why it failed."""
        served = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='line_cycles'").fetchone()
        line = ("c.part_id, c.error_code, c.error_text, c.acked_at FROM inspections i "
                "LEFT JOIN line_cycles c ON c.inspection_id = i.id" if served
                else "NULL, NULL, NULL, NULL FROM inspections i")
        sql = f"SELECT i.*, {line} WHERE i.time >= ?" + (" AND i.verdict = 'NG'" if ng_only else "") + " ORDER BY i.id"
        return self._db.execute(sql, (since or 0.0,))


#: the line's columns of the CSV export, empty for inspections no PLC triggered
LINE_COLUMNS = ("part_id", "error_code", "error_text", "acked_at")


def save_ng_copy(image, log_path: str | Path, name: str, number: int) -> str:
    """Keep an NG image as PNG in ``<recipe>.ng/`` beside its results log (recipe setting
    ``copy_ng_images``; the window and ``okng serve`` alike); returns the copy's path."""
    import cv2
    import numpy as np

    from .atomic import write_bytes_atomic
    from .errors import OkngError
    from .recipes import safe_file_stem

    folder = Path(log_path).with_suffix("").with_suffix(".ng")
    folder.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OkngError("could not encode the NG image")
    stem = safe_file_stem(Path(name).stem)[:60]
    target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{number:06d}-{stem}.png"
    write_bytes_atomic(target, png.tobytes())
    return str(target)


def _cell(v: object) -> object:
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@"):
        return "'" + v
    return v
