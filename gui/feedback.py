"""FeedbackController: click-to-label feedback (issue 4), the GUI-thread half.

The operator clicks a highlighted region of the shown result and marks it "false alarm" or
"real defect", or marks the whole part OK / NG. The learner call (and the re-inspection of
the labelled image under the new model) runs as one job on the engine thread; back on the GUI
thread the label is committed to the recipe's label store *first* and only then acknowledged
on screen, the new detector becomes current (thresholds stay where the operator set them) and
the labelled result shows its new score.

Labels live beside the recipe as ``<recipe>.labels.sqlite``; for a recipe not saved yet, in
``<labels_dir>/<recipe name>.labels.sqlite`` (copied beside the recipe on its first save).
All learner calls go through the serial runner, so the learner is never touched by two threads.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, Signal

from core import find_regions, load_image, region_at
from core.atomic import write_bytes_atomic
from core.errors import OkngError
from core.feedback import FeedbackLearner, FeedbackRecord
from core.jobs import Progress
from core.labels import Label, LabelStore, RegionShape, array_sha256, file_sha256
from core.recipes import safe_file_stem

log = logging.getLogger(__name__)
KIND_TEXT = {"false_alarm": "false alarm", "defect": "real defect", "image_ok": "part OK", "image_ng": "part NG"}


@dataclass(frozen=True)
class LabelRow:
    """One line of the labels panel (plain data)."""

    id: int
    created_at: float
    image_name: str
    kind: str
    score_before: float | None
    score_after: float | None
    undone: bool = False


@dataclass(frozen=True)
class _Outcome:
    record: FeedbackRecord | None
    detector: object
    inspection: object | None  # re-inspection of the labelled image under the new model
    sha256: str = ""


@dataclass
class _Step:
    """One undoable change on the learner's stack."""

    label_id: int | None  # None for "reset weights"
    result_id: int | None
    before: tuple[float, np.ndarray, str] | None  # the result's score, map and verdict before
    added_ok_path: str | None = None


def _feedback_job(learner: FeedbackLearner, kind: str, image, path: str | None, mask, token):
    yield Progress(0, 1, f"learning: {KIND_TEXT[kind]}")
    if image is None:
        image = load_image(path)
    sha = file_sha256(path) if path else array_sha256(image)
    token.raise_if_cancelled()
    mark = learner.mark_false_alarm if kind in ("false_alarm", "image_ok") else learner.mark_defect
    top = learner._undo[-1] if learner._undo else None
    try:
        record = mark(image, mask)
    except BaseException:
        if learner._undo and learner._undo[-1] is not top:
            learner.undo()  # a half-applied label leaves no trace in the model
        raise
    det = learner.detector
    return _Outcome(record, det, det.inspect([image])[0], sha)


def _undo_job(learner: FeedbackLearner, token):
    yield Progress(0, 1, "undoing the last label")
    learner.undo()
    return _Outcome(None, learner.detector, None)


def _reset_job(learner: FeedbackLearner, image, token):
    yield Progress(0, 1, "resetting channel weights")
    learner.reset_weights()
    det = learner.detector
    return _Outcome(None, det, det.inspect([image])[0] if image is not None else None)


class FeedbackController(QObject):
    labels_changed = Signal(list)  # [LabelRow], oldest first
    weights_changed = Signal(object)  # WeightChange | None
    selection_changed = Signal(object)  # (N, 2) contour of the selected region, or None
    can_undo_changed = Signal(bool)
    label_saved = Signal(int)  # label id, emitted after the SQLite commit

    def __init__(self, station, labels_dir: str | Path | None = None) -> None:
        super().__init__(station)
        self.station = station
        self.labels_dir = Path(labels_dir) if labels_dir is not None else None
        self.operator = ""
        self.reweight = False
        self.learner: FeedbackLearner | None = None
        self.model_id = ""
        self._revision = 0
        self._store: LabelStore | None = None
        self._selected: tuple[int, np.ndarray, np.ndarray] | None = None  # (result id, mask, contour)
        self._steps: list[_Step] = []
        self._pending: dict | None = None  # the request of the running feedback job
        self._scores: dict[int, tuple[float, float]] = {}  # label id -> (before, after), this session

    # -- model & store lifecycle (called by the station controller) -------------------------------
    def model_replaced(self, detector, model_id: str) -> None:
        """A freshly fitted or loaded model: new learner, empty undo stack."""
        self.learner = FeedbackLearner(detector, reweight=self.reweight) if detector is not None else None
        self.model_id, self._revision = model_id, 0
        self._steps.clear()
        self._select(None)
        self.can_undo_changed.emit(False)
        self.weights_changed.emit(None)

    def set_reweight(self, on: bool) -> None:
        """Channel reweighting on/off for the next labels (the OK memory update always runs)."""
        self.reweight = bool(on)
        if self.learner is not None:
            self.learner.reweight = self.reweight

    def recipe_replaced(self) -> None:
        self.close_store()
        self._scores.clear()
        self.labels_changed.emit(self.rows())

    def close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store_path(self) -> Path:
        st = self.station
        if st.recipe_path is not None:
            return Path(st.recipe_path).with_suffix(".labels.sqlite")
        if self.labels_dir is None:
            from PySide6.QtCore import QStandardPaths

            loc = QStandardPaths.StandardLocation.AppDataLocation
            self.labels_dir = Path(QStandardPaths.writableLocation(loc)) / "labels"
        return self.labels_dir / f"{safe_file_stem(st.recipe.name)}.labels.sqlite"

    def store(self) -> LabelStore:
        path = self.store_path
        if self._store is None or self._store.path != path:
            self.close_store()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._store = LabelStore(path)
        return self._store

    def recipe_saved_to(self, recipe_path: Path) -> None:
        """Carry the labels of a not-yet-saved recipe over to the file beside it."""
        target = Path(recipe_path).with_suffix(".labels.sqlite")
        if self._store is None or self._store.path == target or target.exists():
            return
        try:
            dst = sqlite3.connect(str(target))
            try:
                self._store._db.backup(dst)
            finally:
                dst.close()
        except sqlite3.Error as exc:
            self.station.error.emit(f"Could not copy the labels beside the recipe: {exc}")
            return
        self.close_store()
        self.labels_changed.emit(self.rows())

    # -- selection ---------------------------------------------------------------------------------
    def select_at(self, row: int, col: int) -> bool:
        """Select the highlighted region under map pixel (row, col) of the shown result."""
        st = self.station
        rec = st.results.get(st.shown_id) if st.shown_id is not None else None
        region = None
        if rec is not None and st.pixel_threshold is not None:
            region = region_at(find_regions(rec.anomaly_map, st.pixel_threshold), row, col)
        if region is None:
            self._select(None)
            st.status.emit("No highlighted region here — nothing labelled. Click inside an outline.")
            return False
        self._select((rec.id, region.mask, region.contour))
        st.status.emit("Region selected: F = false alarm (this is fine), D = real defect")
        return True

    def _select(self, sel) -> None:
        self._selected = sel
        self.selection_changed.emit(None if sel is None else sel[2])

    @property
    def has_selection(self) -> bool:
        return self._selected is not None and self._selected[0] == self.station.shown_id

    # -- marking -----------------------------------------------------------------------------------
    def mark_region(self, kind: str) -> None:
        """"false_alarm" or "defect" on the selected region."""
        if not self.has_selection:
            self.station.status.emit("Click a highlighted region first — nothing labelled.")
            return
        rid, mask, _ = self._selected
        self._submit(kind, rid, mask)

    def mark_image(self, kind: str) -> None:
        """"image_ok" or "image_ng" on the whole shown part."""
        st = self.station
        if st.shown_id not in st.results:
            st.status.emit("No inspected image to label.")
            return
        self._submit(kind, st.shown_id, None)

    def _busy(self) -> bool:
        st = self.station
        if self.learner is None:
            st.error.emit("No model yet: fit the OK images first (F5) or open a recipe.")
            return True
        if self._pending is not None:
            st.status.emit("Still learning from the previous label…")
            return True
        if st.live:
            st.error.emit("Stop live inspection before labelling (Space).")
            return True
        return False

    def _submit(self, kind: str, result_id: int, mask: np.ndarray | None) -> None:
        if self._busy():
            return
        st = self.station
        rec = st.results[result_id]
        self._pending = {"kind": kind, "result_id": result_id, "mask": mask, "name": rec.name, "path": rec.path,
                         "before": (rec.score, rec.anomaly_map, rec.verdict), "image": rec.image}
        self._select(None)
        learner, image, path = self.learner, rec.image, rec.path
        st.runner.submit(lambda token: _feedback_job(learner, kind, image, path, mask, token), tag="feedback")
        st.status.emit(f"Learning from '{KIND_TEXT[kind]}' on {rec.name}…")

    def undo_last(self) -> None:
        if not self._steps:
            self.station.status.emit("Nothing to undo.")
            return
        if self._busy():
            return
        self._pending = {"undo": self._steps[-1]}
        learner = self.learner
        self.station.runner.submit(lambda token: _undo_job(learner, token), tag="feedback")

    def reset_weights(self) -> None:
        if self._busy():
            return
        st = self.station
        rec = st.results.get(st.shown_id) if st.shown_id is not None else None
        image = rec.image if rec is not None else None
        if rec is not None and image is None and rec.path is not None:
            try:
                image = load_image(rec.path)
            except OkngError:
                image = None
        self._pending = {"reset": True, "result_id": rec.id if rec is not None and image is not None else None,
                         "before": (rec.score, rec.anomaly_map, rec.verdict) if rec is not None else None}
        learner = self.learner
        st.runner.submit(lambda token: _reset_job(learner, image, token), tag="feedback")

    # -- job results (GUI thread) --------------------------------------------------------------------
    def on_returned(self, out: _Outcome) -> None:
        req, self._pending = self._pending, None
        if req is None:
            return
        if "undo" in req:
            self._apply_undo(req["undo"], out)
        elif "reset" in req:
            self._revision += 1
            self._push_step(_Step(None, req["result_id"], req["before"]))
            self._apply_model(out.detector, req["result_id"], out.inspection)
            self.weights_changed.emit(None)
            self.station.status.emit("Channel weights reset (Ctrl+Z to undo)")
        else:
            self._apply_label(req, out)
        self.can_undo_changed.emit(bool(self._steps))

    def on_failed(self, exc: object) -> None:
        self._pending = None
        self.station.error.emit(f"Labelling failed, the model is unchanged: {exc}")

    def _push_step(self, step: _Step) -> None:
        self._steps.append(step)
        del self._steps[: -self.learner.max_undo]  # the learner keeps this many snapshots

    def _apply_label(self, req: dict, out: _Outcome) -> None:
        st, rec = self.station, out.record
        kind, mask = req["kind"], req["mask"]
        name = req["name"]
        label = Label(image_path=req["path"] or name, image_sha256=out.sha256, kind=kind,
                      model_id=f"{self.model_id}#r{self._revision}", operator=self.operator,
                      region=RegionShape.from_mask(mask) if mask is not None else None,
                      map_size=int(req["before"][1].shape[0]), score=float(rec.score_before))
        try:
            label_id = self.store().add(label)  # committed (WAL, synchronous=FULL) before it returns
        except (sqlite3.Error, OSError, ValueError) as exc:
            # not durable -> not applied: give the learner its previous model back
            self._pending = {"undo": None}
            learner = self.learner
            st.runner.submit(lambda token: _undo_job(learner, token), tag="feedback")
            st.error.emit(f"Label NOT saved ({exc}); the model change was reverted.")
            return
        self._revision += 1
        self._scores[label_id] = (rec.score_before, rec.score_after)
        added = None
        if kind == "image_ok" and req["path"] and req["path"] not in st.recipe.ok_paths:
            added = req["path"]
            st.recipe.ok_paths.append(added)
            st.ok_paths_changed.emit(st.ok_paths)
        self._push_step(_Step(label_id, req["result_id"], req["before"], added))
        self._apply_model(out.detector, req["result_id"], out.inspection)
        if rec.weights is not None:
            self.weights_changed.emit(rec.weights)
        far = "" if rec.expected_false_alarm_rate is None else \
            f"; expected false alarms now {rec.expected_false_alarm_rate:.1%}"
        self.labels_changed.emit(self.rows())
        self.label_saved.emit(label_id)
        st.status.emit(f"Label #{label_id} saved: {KIND_TEXT[kind]} on {name} — score "
                       f"{rec.score_before:.2f} → {rec.score_after:.2f}{far} (Ctrl+Z to undo)")

    def _apply_undo(self, step: _Step | None, out: _Outcome) -> None:
        st = self.station
        if step is None:  # a label that could not be stored: only the model goes back
            st._set_detector(out.detector, st.image_threshold, st.pixel_threshold)
            return
        self._steps.pop()
        self._revision -= 1
        if step.label_id is not None:
            try:
                self.store().undo(step.label_id)
            except sqlite3.Error as exc:
                st.error.emit(f"Could not mark label #{step.label_id} undone in the label store: {exc}")
        if step.added_ok_path is not None and step.added_ok_path in st.recipe.ok_paths:
            st.recipe.ok_paths.remove(step.added_ok_path)
            st.ok_paths_changed.emit(st.ok_paths)
        st._set_detector(out.detector, st.image_threshold, st.pixel_threshold)
        r = st.results.get(step.result_id) if step.result_id is not None else None
        if r is not None and step.before is not None:
            # the model is exactly the one that produced these values: restore them bit for bit
            r.score, r.anomaly_map, _ = step.before
            r.verdict = st._judge(r.score)
            st.results_changed.emit()
            st.show_result(r.id)
        self.weights_changed.emit(None)
        self.labels_changed.emit(self.rows())
        what = "weights reset" if step.label_id is None else f"label #{step.label_id}"
        st.status.emit(f"Undone: {what}" + (f"; {r.name} scores {r.score:.2f} again" if r is not None else ""))

    def _apply_model(self, detector, result_id: int | None, inspection) -> None:
        st = self.station
        st._set_detector(detector, st.image_threshold, st.pixel_threshold)  # operator's thresholds stay
        r = st.results.get(result_id) if result_id is not None else None
        if r is not None and inspection is not None:
            r.score, r.anomaly_map = inspection.score, inspection.anomaly_map
            r.verdict = st._judge(r.score)
            st.results_changed.emit()
            st.show_result(r.id)

    # -- list, export ----------------------------------------------------------------------------------
    def rows(self) -> list[LabelRow]:
        if self._store is None and not self.store_path.exists():
            return []  # do not create a file just to list nothing
        try:
            labels = self.store().labels(include_undone=True)
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.warning("label store unreadable: %s", exc)
            return []
        out = []
        for lab in labels:
            before, after = self._scores.get(lab.id, (lab.score, None))
            out.append(LabelRow(lab.id, lab.created_at or 0.0, Path(lab.image_path).name, lab.kind, before, after,
                                lab.undone_at is not None))
        return out

    def export(self, path: str) -> None:
        fmt = "json" if path.lower().endswith(".json") else "csv"
        try:
            s = self.store()
            text = s.export_json() if fmt == "json" else s.export_csv()
            write_bytes_atomic(path, text.encode("utf-8"))
        except (OkngError, sqlite3.Error, OSError) as exc:
            self.station.error.emit(f"Export failed: {exc}")
            return
        self.station.status.emit(f"Labels exported to {path}")

    def refresh(self) -> None:
        self.labels_changed.emit(self.rows())


def model_id_for(path: str | None, n_samples: int) -> str:
    """A readable model identity: the model file name and its time, or the fit time."""
    if path and Path(path).is_file():
        t = time.strftime("%Y%m%dT%H%M%S", time.localtime(Path(path).stat().st_mtime))
        return f"{Path(path).name}@{t}"
    return f"fit@{time.strftime('%Y%m%dT%H%M%S')}/{n_samples}ok"
