"""What the line adds to a recipe's results log (``<recipe>.results.sqlite``).

The results log stays the one source of truth: an inspection triggered by the PLC is a row
of ``inspections`` like any other, written together with a row of ``line_cycles`` (part id,
recipe index, error, when the PLC acknowledged it) in one transaction, before the PLC sees
ResultReady. The MQTT outbox is the log itself: line cycles with an id above the sink's
``published:<sink>`` mark in ``meta`` are still to send, oldest first. Inspections no PLC
triggered (an engineer re-inspecting the night's images in the window) are not line
results and never published (found on a night shift: they reached the plant's topic as
parts without a part id). So a crash between
inspection and publish, or between result and ack, loses nothing: on restart the unsent rows
are sent and an unacknowledged result is presented again; an acknowledged one never is.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import sqlitedb
from ..results_log import LogEntry, ResultsLog

_SCHEMA = """
CREATE TABLE IF NOT EXISTS line_cycles (
    inspection_id INTEGER PRIMARY KEY,  -- inspections.id
    part_id INTEGER NOT NULL,
    recipe_index INTEGER NOT NULL,
    error_code INTEGER NOT NULL,
    error_text TEXT NOT NULL,
    acked_at REAL                      -- when the PLC acknowledged the result; NULL: not yet
);
"""


def _open(path: Path) -> sqlite3.Connection:
    """A connection shared by threads (callers serialise its use with a lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # an unsaved recipe's log lives in the data folder
    ResultsLog(path).close()  # the log's own schema first, if the file is new
    con = sqlite3.connect(str(path), timeout=sqlitedb.BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    con.execute(f"PRAGMA busy_timeout={int(sqlitedb.BUSY_TIMEOUT * 1000)}")
    sqlitedb.enable_wal(con)
    con.execute("PRAGMA synchronous=NORMAL")
    sqlitedb.retry_busy(lambda: con.executescript(_SCHEMA))
    return con


@dataclass(frozen=True)
class LoggedCycle:
    inspection_id: int
    part_id: int
    recipe_index: int
    verdict: str
    score: float | None
    error_code: int
    error_text: str
    acked_at: float | None


class LineLog:
    """A recipe's results log with the line's cycles; any thread (one at a time, locked)."""

    def __init__(self, path: str | Path, max_rows: int | None = None, max_age_days: float | None = None) -> None:
        self.path = Path(path)
        self._db = _open(self.path)
        self._lock = threading.Lock()
        self.results = ResultsLog(self.path, max_rows, max_age_days, shared=True)

    def close(self) -> None:
        with self._lock:
            self.results.close()
            self._db.close()

    def record(self, entry: LogEntry, part_id: int, recipe_index: int, error_code: int = 0,
               error_text: str = "") -> int:
        """Log one cycle (inspection + line row, one transaction); returns the inspection id."""
        def line_row(con: sqlite3.Connection, rowid: int) -> None:
            con.execute("INSERT INTO line_cycles VALUES (?, ?, ?, ?, ?, NULL)",
                        (rowid, part_id, recipe_index, error_code, error_text))

        with self._lock:
            return self.results.add(entry, also=line_row)

    def acknowledge(self, inspection_id: int, when: float | None = None) -> bool:
        """Record the PLC's ack (durable when this returns). False: it was acknowledged already."""
        with self._lock:
            cur = sqlitedb.retry_busy(lambda: self._db.execute(
                "UPDATE line_cycles SET acked_at = ? WHERE inspection_id = ? AND acked_at IS NULL",
                (time.time() if when is None else when, inspection_id)))
            return cur.rowcount == 1

    def cycle(self, inspection_id: int) -> LoggedCycle | None:
        rows = self._cycles("WHERE c.inspection_id = ?", (inspection_id,))
        return rows[0] if rows else None

    def unacknowledged(self) -> LoggedCycle | None:
        """The newest cycle if the PLC never acknowledged it (at most one can be: a trigger
        is refused while a result is held)."""
        rows = self._cycles("ORDER BY c.inspection_id DESC LIMIT 1", ())
        return rows[0] if rows and rows[0].acked_at is None else None

    def cycles(self) -> list[LoggedCycle]:
        """Every cycle, oldest first (tests, audits)."""
        return self._cycles("ORDER BY c.inspection_id", ())

    def _cycles(self, tail: str, params: tuple) -> list[LoggedCycle]:
        sql = ("SELECT c.inspection_id, c.part_id, c.recipe_index, i.verdict, i.score, c.error_code, c.error_text, "
               "c.acked_at FROM line_cycles c JOIN inspections i ON i.id = c.inspection_id " + tail)
        with self._lock:
            rows = sqlitedb.retry_busy(lambda: self._db.execute(sql, params).fetchall())
        return [LoggedCycle(*r) for r in rows]

    def max_part_id(self) -> int:
        with self._lock:
            (m,) = self._db.execute("SELECT MAX(part_id) FROM line_cycles").fetchone()
        return int(m or 0)


class Outbox:
    """The log rows a sink has not published yet, read in order; its own connection, so a
    publisher thread can use it beside the inspection thread's :class:`LineLog`."""

    def __init__(self, path: str | Path, sink: str) -> None:
        self.path = Path(path)
        self.key = f"published:{sink}"
        self._db = _open(self.path)
        # a new sink starts after the rows logged before it existed: history is not re-sent
        sqlitedb.retry_busy(lambda: self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM inspections))", (self.key,)))

    def close(self) -> None:
        self._db.close()

    @property
    def published_upto(self) -> int:
        (v,) = self._db.execute("SELECT value FROM meta WHERE key = ?", (self.key,)).fetchone()
        return int(v)

    def pending(self, after: int | None = None, limit: int = 100) -> list[tuple[LogEntry, dict]]:
        """(log entry, line fields) for the line cycles after ``after`` (default: the mark), oldest first."""
        start = self.published_upto if after is None else after
        rows = sqlitedb.retry_busy(lambda: self._db.execute(
            "SELECT i.*, c.part_id, c.recipe_index, c.error_code, c.error_text FROM inspections i "
            "JOIN line_cycles c ON c.inspection_id = i.id WHERE i.id > ? ORDER BY i.id LIMIT ?",
            (start, int(limit))).fetchall())
        return [(ResultsLog._entry(r[:12]), {"part_id": r[12], "recipe_index": r[13], "error_code": r[14],
                                             "error_text": r[15]}) for r in rows]

    def count_pending(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM line_cycles c JOIN inspections i ON i.id = c.inspection_id "
                                "WHERE c.inspection_id > ?", (self.published_upto,)).fetchone()  # as pending()
        return int(n)

    def mark_published(self, inspection_id: int) -> None:
        """Move the mark forward (never back)."""
        sqlitedb.retry_busy(lambda: self._db.execute(
            "UPDATE meta SET value = ? WHERE key = ? AND CAST(value AS INTEGER) < ?",
            (str(int(inspection_id)), self.key, int(inspection_id))))
