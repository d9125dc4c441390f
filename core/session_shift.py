"""The session's shift: every result goes to the results log; counters come from it.

Kept beside the recipe as ``<recipe>.results.sqlite`` (for a recipe not saved yet, in the
session's data folder, carried over on its first save). NG images can be kept as PNG copies
in ``<recipe>.ng/`` (recipe setting ``copy_ng_images``) for the quality engineer.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_bytes_atomic
from .errors import OkngError
from .events import Event
from .labels import file_sha256
from .results_log import Counters, LogEntry, ResultsLog, save_ng_copy, truth_from_path

if TYPE_CHECKING:
    from .session import InspectionSession
    from .session_results import ResultRecord

log = logging.getLogger(__name__)
#: seconds between counter updates during a run: two queries per frame on the UI thread at
#: 40 frames/s is work nobody can read
COUNTERS_EVERY = 0.5


class ShiftLog:
    def __init__(self, session: InspectionSession) -> None:
        self.session = session
        self.counters_changed = Event()  # (Counters)
        self._log: ResultsLog | None = None
        self._counted_at = 0.0  # when counters were last sent (a live run sends them twice a second)

    @property
    def path(self) -> Path:
        return self.session.file_beside_recipe(".results.sqlite")

    def log(self) -> ResultsLog:
        path = self.path
        if self._log is None or self._log.path != path:
            self.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            st = self.session.recipe.station
            self._log = ResultsLog(path, st.get("log_max_rows"), st.get("log_max_age_days"))
        return self._log

    def checkpoint(self) -> None:
        """The open log's write-ahead log folded into its file (after a recipe save)."""
        if self._log is not None and self._log.path == self.path:
            self._log.checkpoint()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def recipe_replaced(self) -> None:
        self.close()
        self.refresh()

    def record(self, rec: ResultRecord, model_id: str) -> None:
        """Log one inspection; a log that cannot be written is an error on screen, never a
        lost inspection silently."""
        s = self.session
        try:
            sha = rec.sha256 or (file_sha256(rec.path) if rec.path else "")
            truth = s.demo_truth.get(rec.path or "") or truth_from_path(rec.path)
            copy = self._keep_ng(rec) if rec.verdict == "NG" and s.recipe.station.get("copy_ng_images") else None
            self.log().add(LogEntry(time.time(), rec.path or rec.name, sha, rec.score, rec.verdict,
                                    s.image_threshold, s.pixel_threshold, model_id, s.operator, truth, copy))
        except (sqlite3.Error, OSError, OkngError, ValueError) as exc:
            s.error.emit(f"Result of {rec.name} NOT logged: {exc}")
            return
        if time.monotonic() - self._counted_at >= COUNTERS_EVERY:
            self.refresh()

    def refresh(self) -> None:
        """Send the counters now (the session calls it when a run ends)."""
        self._counted_at = time.monotonic()
        self.counters_changed.emit(self.counters())

    def _keep_ng(self, rec: ResultRecord) -> str | None:
        image = rec.image if rec.image is not None else self.session.image_of(rec)
        if image is None:
            return None
        return save_ng_copy(image, self.path, rec.name, rec.id)

    def review(self) -> None:
        """Show this shift's NG parts and failed cycles again in the results table, scored by
        the current model, to look at their heat maps and label false alarms, *without*
        logging them again (found on a night shift: the window showed nothing of the night, and
        re-inspecting the files counted every one as a new part, moved the yield and went to
        the plant's MQTT topic). Reads each part's image where the log says it was, else its
        kept NG copy; parts whose image is gone are counted in the status line."""
        s = self.session
        try:
            log = self.log()
            rows = [e for e in reversed(log.entries(since=log.shift_start, limit=None))
                    if e.verdict in ("NG", "ERROR")]
        except (sqlite3.Error, OSError, OkngError) as exc:
            s.error.emit(f"Cannot read the results log: {exc}")
            return
        paths, gone, seen = [], 0, set()
        for e in rows:
            found = next((p for p in (e.image_path, e.ng_copy) if p and Path(p).is_file()), None)
            if found is None:
                gone += 1
            elif found not in seen:
                seen.add(found)
                paths.append(found)
        if not paths:
            s.error.emit("Nothing to review: no NG part or failed cycle of this shift has its image on disk"
                         + (f" ({gone} image(s) gone)" if gone else ""))
            return
        note = f"; {gone} part(s) without an image on disk" if gone else ""
        s.inspect_paths(paths, record=False,
                        said=f"Reviewing {len(paths)} NG or failed part(s) of this shift with the current model "
                             f"(not logged or counted again){note}…")

    def counters(self) -> Counters | None:
        if self._log is None and not self.path.exists():
            return None  # nothing inspected under this recipe yet: no file just to say so
        try:
            return self.log().counters()
        except sqlite3.Error as exc:
            log.warning("results log unreadable: %s", exc)
            return None

    def reset_counters(self) -> None:
        """A new shift: counters from zero, and no operator until the next one gives a name (the
        previous shift's name carried over, labels would be made under it)."""
        self.log().reset_counters()
        self.session.operator = ""
        self.refresh()
        self.session.status.emit("Counters reset: a new shift starts now (the log keeps every result); "
                                 "enter your name in the Labels panel before labelling")

    def export(self, path: str, ng_only: bool = False, shift_only: bool = False) -> None:
        """The log as CSV: all of it or the NG rows, since the shift started or ever."""
        try:
            log = self.log()
            since = log.shift_start if shift_only else None
            write_bytes_atomic(path, log.export_csv(ng_only, since).encode("utf-8"))
        except (OkngError, sqlite3.Error, OSError) as exc:
            self.session.error.emit(f"Export failed: {exc}")
            return
        self.session.status.emit(f"Results log exported to {path}")
