"""The session's click-to-label half: select a region, label it, undo, replay after a refit.

A label travels: the operator's click selects a region of the shown result; the label job
(:mod:`core.feedback_jobs`) updates the model on the engine thread and re-judges every result;
back here, if the label would turn any NG verdict into OK the session asks first
(:class:`~core.session.Question`), then the label is committed to SQLite *before* it takes
effect on screen, and the new detector becomes current with the operator's thresholds kept.

Labels are the state: the store keeps what is needed to replay each one (image path and
content hash, region, kind), a refit replays every active label, and the model file records
which labels it holds (:attr:`core.detector.Detector.applied_labels`).
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .atomic import write_bytes_atomic
from .errors import OkngError
from .events import Event, Question
from .feedback import FeedbackLearner, WeightGuard
from .feedback_jobs import (
    KIND_TEXT,
    LabelOutcome,
    ModelOutcome,
    ReplayOutcome,
    Rescored,
    label_job,
    replay_labels_job,
    reset_weights_job,
    undo_job,
)
from .labels import Label, LabelStore, RegionShape, file_sha256
from .regions import region_at
from .roles import ENGINEER
from .session_results import judge, outlined_regions

if TYPE_CHECKING:
    from .detector import Detector
    from .session import InspectionSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelRow:
    """One line of a labels list (plain data)."""

    id: int
    created_at: float
    image_name: str
    kind: str
    score_before: float | None
    score_after: float | None
    undone: bool = False
    in_model: bool = False
    #: who undid or withdrew it, and when ("" / None: not undone, or not recorded)
    undone_by: str = ""
    undone_at: float | None = None


@dataclass
class _Step:
    """One undoable change."""

    label_id: int | None  # None for "reset weights"
    result_id: int | None
    before: tuple[float, np.ndarray, str] | None  # the labelled result's score, map and verdict
    added_ok_path: str | None = None


class LabelBook:
    def __init__(self, session: InspectionSession) -> None:
        self.session = session
        self.labels_changed = Event()  # ([LabelRow], oldest first)
        self.weights_changed = Event()  # (WeightChange | None)
        self.weights_held_back = Event()  # (str) why the last label's reweighting was held back; "" none
        self.selection_changed = Event()  # ((N, 2) contour of the selected region, or None)
        self.can_undo_changed = Event()  # (bool)
        self.label_saved = Event()  # (label id), after the SQLite commit
        self.reweight_changed = Event()  # (bool) what the current model does
        self.reweight = False
        self.learner: FeedbackLearner | None = None
        self.model_id = ""
        self._store: LabelStore | None = None
        self._selected: tuple[int, np.ndarray, np.ndarray] | None = None  # (result id, mask, contour)
        self._steps: list[_Step] = []
        self._pending = False
        self._scores: dict[int, tuple[float, float]] = {}  # label id -> (before, after), this session

    @property
    def operator(self) -> str:
        return self.session.operator

    @operator.setter
    def operator(self, name: str) -> None:
        self.session.operator = name.strip()

    @property
    def current_model_id(self) -> str:
        """The fitted or loaded model plus the labels it has learnt since (results log)."""
        det = self.session.detector
        n = len(det.applied_labels) if det is not None else 0
        return f"{self.model_id}+{n}labels" if n else self.model_id

    # -- model & store lifecycle ------------------------------------------------------------
    def model_replaced(self, detector: Detector | None, replay: bool, judged_ng: list | None = None,
                       verdicts_before: dict[int, str] | None = None) -> None:
        """A fitted or loaded model: new learner, empty undo history. After a fit
        (``replay``) every active stored label is applied to it again, its channel weights
        keeping NG the results ``judged_ng`` before the fit (None: those judged NG now);
        ``verdicts_before``: the results' verdicts before the fit (the table marks the changed)."""
        if detector is not None:
            self.reweight = detector.model.channel_weights is not None or (replay and self.reweight)
        radius = self.session.recipe.station.get("feedback_radius")  # patches; None: anywhere on the part
        params = {"radius": int(radius)} if radius is not None else {}
        self.learner = (FeedbackLearner(detector, reweight=self.reweight, memory_params=params)
                        if detector is not None else None)
        self.model_id = _model_id(self.session.recipe.model_path if not replay else None, detector)
        self._steps.clear()
        self._select(None)
        self.can_undo_changed.emit(False)
        self.weights_changed.emit(self.learner.held_weights() if self.learner is not None else None)
        self.reweight_changed.emit(self.reweight)
        if not replay and detector is not None and detector.applied_labels:
            self._check_learnt_labels_are_here(detector)
        self.labels_changed.emit(self.rows())
        if replay and detector is not None and detector.config.tiled:
            if any(not row.undone for row in self.rows()):  # a recipe without labels hears nothing of it
                self.session.status.emit("Labels are not replayed on a tiled model: feedback on tiles is not "
                                         "available yet")
        elif replay and detector is not None and self._replay(judged_ng, verdicts_before):
            return  # the replay's end re-scores the results, under the model with the labels
        self.session.rescore_results(before=verdicts_before)

    def _check_learnt_labels_are_here(self, detector: Detector) -> None:
        """An opened model that learnt labels its store does not hold (the store beside the
        recipe replaced, emptied, or copied without its ``-wal`` file): say so, and keep new
        labels from taking their ids. Found trying the station: the next label became #1,
        and was listed as learnt by a model that had learnt another #1."""
        try:
            store = self.store()
            gone = sorted(set(detector.applied_labels) - store.ids())
            if gone:
                store.reserve_ids_through(max(detector.applied_labels))
        except (sqlite3.Error, OSError, ValueError) as exc:
            self.session.error.emit(f"Labels could not be read: {exc}")
            return
        if gone:
            self.session.error.emit(
                f"This model learnt {len(gone)} label(s) that the labels store beside the recipe does not hold "
                f"(#{', #'.join(map(str, gone[:5]))}{', …' if len(gone) > 5 else ''}: the store was replaced, emptied "
                f"or copied without its -wal file). Their effect stays in the model until the next fit, which "
                f"leaves them out; new labels take new numbers")

    def _replay(self, judged_ng: list | None = None, verdicts_before: dict[int, str] | None = None) -> bool:
        """Replay the active stored labels into the new model (a job); False: none to replay."""
        try:
            active = self.store().labels() if self.store_path.exists() else []
        except (sqlite3.Error, OSError, ValueError) as exc:
            self.session.error.emit(f"Labels could not be read, none replayed: {exc}")
            return False
        if not active:
            return False
        s, learner = self.session, self.learner
        self._pending = True
        # the parts judged NG until now stay NG under the replayed channel weights, as under a
        # label made now; a part a replayed label accepts may pass (that is the label)
        # (a "part is OK": a false alarm accepts one region, the part may be NG for another)
        accepted = {lab.image_path for lab in active if lab.kind == "image_ok"}
        ng = [r for r in s.results if r.verdict == "NG"] if judged_ng is None else judged_ng
        protect = [r.embedding for r in ng if r.embedding is not None and r.path not in accepted]

        def done(out: ReplayOutcome) -> None:
            self._pending = False
            learner.clear_undo()
            out.detector.applied_labels = tuple(out.applied)
            s.set_detector(out.detector, s.image_threshold, s.pixel_threshold)
            if out.detector.model.channel_weights is not None and not self.reweight:
                # labels made with reweighting learnt weights again: the box shows what the model holds
                self.reweight = learner.reweight = True
                self.reweight_changed.emit(True)
            self.weights_changed.emit(learner.held_weights())
            self.labels_changed.emit(self.rows())
            msg = f"{len(out.applied)} stored label(s) replayed into the new model"
            if s.fit_line:  # the fit's line (why the threshold moved, what was held out) stays said
                msg, s.fit_line = f"{s.fit_line}. {msg[0].upper()}{msg[1:]}", ""
            if out.skipped:
                lid, why = out.skipped[0]
                s.error.emit(f"{msg}; {len(out.skipped)} could not be, e.g. label #{lid}: {why}")
            else:
                s.status.emit(msg)
            s.rescore_results(before=verdicts_before)  # then: which verdicts the new model changed

        def failed(exc: BaseException) -> None:
            self._pending = False
            s.error.emit(f"Stored labels could not be replayed: {exc}")
            s.rescore_results(before=verdicts_before)

        s.submit(partial(replay_labels_job, learner, active, protect=protect), on_returned=done, on_failed=failed,
                  on_cancelled=lambda: failed(RuntimeError("cancelled")))
        return True

    def set_reweight(self, on: bool) -> None:
        """Channel reweighting on/off for the next labels (the OK memory update always runs);
        an engineer's setting: in operator mode it is refused and stays as it was."""
        if bool(on) != self.reweight and not self.session._engineer_only("change channel weight learning"):
            self.reweight_changed.emit(self.reweight)  # the check box shows what holds
            return
        if bool(on) != self.reweight and self._pending:  # a label or replay runs with the setting it has
            self.session.status.emit("Still learning from labels; change channel weight learning when it is done")
            self.reweight_changed.emit(self.reweight)
            return
        det = self.session.detector
        if on and det is not None and not det.model.supports_channel_weights:
            self.session.error.emit(f"Model {det.config.model} does not learn channel weights (its scores are "
                                    f"normalised per position); false-alarm labels still teach it.")
            self.reweight_changed.emit(self.reweight)
            return
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

    def checkpoint(self) -> None:
        """The open store's write-ahead log folded into its file (after a recipe save)."""
        if self._store is not None and self._store.path == self.store_path:
            self._store.checkpoint()

    @property
    def store_path(self) -> Path:
        return self.session.file_beside_recipe(".labels.sqlite")

    def store(self) -> LabelStore:
        path = self.store_path
        if self._store is None or self._store.path != path:
            self.close_store()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._store = LabelStore(path)
        return self._store

    # -- selection --------------------------------------------------------------------------
    def select_at(self, row: int, col: int) -> bool:
        """Select the highlighted region under map pixel (row, col) of the shown result."""
        s = self.session
        rec, region = s.shown, None
        if rec is not None and s.pixel_threshold is not None:
            region = region_at(outlined_regions(rec, s.pixel_threshold)[0], row, col)
        if region is None:
            self._select(None)
            s.status.emit("No highlighted region here — nothing labelled. Click inside an outline.")
            return False
        self._select((rec.id, region.mask, region.contour))
        s.status.emit("Region selected: F = false alarm (this is fine), D = real defect")
        return True

    def _select(self, sel: tuple[int, np.ndarray, np.ndarray] | None) -> None:
        self._selected = sel
        self.selection_changed.emit(None if sel is None else sel[2])

    @property
    def has_selection(self) -> bool:
        return self._selected is not None and self._selected[0] == self.session.shown_id

    # -- labelling --------------------------------------------------------------------------
    def mark_region(self, kind: str) -> None:
        """"false_alarm" or "defect" on the selected region."""
        if not self.has_selection:
            self.session.status.emit("Click a highlighted region first — nothing labelled.")
            return
        rid, mask, _ = self._selected
        self._submit(kind, rid, mask)

    def mark_image(self, kind: str) -> None:
        """"image_ok" or "image_ng" on the whole shown part."""
        if self.session.shown is None:
            self.session.status.emit("No inspected image to label.")
            return
        self._submit(kind, self.session.shown_id, None)

    def mark(self, kind: str) -> None:
        self.mark_region(kind) if kind in ("false_alarm", "defect") else self.mark_image(kind)

    def _busy(self) -> bool:
        s = self.session
        if self.learner is None:
            s.error.emit("No model yet: fit the OK images first (F5) or open a recipe.")
            return True
        if self.learner.detector.config.tiled:
            s.error.emit("Labels cannot teach a tiled model yet (feedback works on whole-image models): "
                         "the label was not recorded.")
            return True
        if self._pending:
            s.status.emit("Still learning from the previous label…")
            return True
        if s.rescoring or s.rescoring_stale:
            s.status.emit("Still re-judging the results under the new model…")
            return True
        if s._still_saving():  # the store may yet be put back: a label made now could be lost
            return True
        if s.live:
            s.error.emit("Stop live inspection before labelling (Space).")
            return True
        if not s.operator:
            s.error.emit("Enter your name (Labels panel) before labelling: every label records who made it.")
            return True
        return False

    def _submit(self, kind: str, result_id: int, mask: np.ndarray | None) -> None:
        if self._busy():
            return
        s = self.session
        rec = s.results.get(result_id)
        req = {"kind": kind, "result_id": result_id, "mask": mask, "name": rec.name, "path": rec.path,
               "before": (rec.score, rec.anomaly_map, rec.verdict), "image": rec.image,
               "newer_from": s.results.next_id}  # results from this id on come after the job's list
        self._select(None)
        self._pending = True
        accepting = kind in ("false_alarm", "image_ok")
        accepted = self.accepted_paths()  # a part an active label accepts may pass, as in a replay
        guarded = [r for r in s.results if r.verdict == "NG" and r.embedding is not None
                   and not (accepting and r.id == result_id)  # the clicked part may pass: that is the label
                   and not (r.path is not None and r.path in accepted)]
        protect = [r.embedding for r in guarded]
        req["protected_ids"] = [r.id for r in guarded]
        job = partial(label_job, self.learner, kind, rec.image, rec.path, mask, s.results.with_embeddings(),
                      protect=protect)
        s.status.emit(f"Learning from '{KIND_TEXT[kind]}' on {rec.name}…")
        s.submit(job, on_returned=lambda out: self._on_label_outcome(req, out), on_failed=self._on_failed,
                  on_cancelled=lambda: self._on_failed(RuntimeError("cancelled")))

    def ok_parts_missing_from(self, ok_paths: list[str], saved_at: float) -> list[str]:
        """Images an active "part is OK" label made after ``saved_at`` (the recipe file's last
        write) put into the OK set that are not in ``ok_paths`` and still exist: the label was
        kept (stored when made) but the change to the OK set was not saved (a crash, or
        Discard). Found trying the station: the label stayed active while the part had
        silently left the OK set. A label older than the saved recipe whose part is not in it
        was taken out on purpose and saved so: left out."""
        if self._store is None and not self.store_path.exists():
            return []
        try:
            labels = self.store().labels()
        except (sqlite3.Error, OSError, ValueError):
            return []
        have = set(ok_paths)
        return list(dict.fromkeys(lab.image_path for lab in labels if lab.kind == "image_ok" and lab.added_ok
                                  and (lab.created_at or 0.0) > saved_at and lab.image_path not in have
                                  and Path(lab.image_path).is_file()))

    def accepted_paths(self) -> set[str]:
        """Image paths of parts an active "part is OK" label accepts (a false alarm accepts one
        region only: the part may be NG for another)."""
        if self._store is None and not self.store_path.exists():
            return set()
        try:
            return {lab.image_path for lab in self.store().labels() if lab.kind == "image_ok"}
        except (sqlite3.Error, OSError, ValueError):
            return set()

    def _on_failed(self, exc: BaseException) -> None:
        self._pending = False
        self.session.error.emit(f"Labelling failed, the model is unchanged: {exc}")

    def _on_label_outcome(self, req: dict, out: LabelOutcome) -> None:
        s = self.session
        flips = [r for r in out.rescored if self._flips_to_ok(r, req)]
        if not flips and not out.defects_flipped:
            self._commit(req, out)
            return
        names = [s.results.get(r.result_id).name for r in flips]
        parts = []
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            parts.append(f"{len(names)} part(s) judged NG would be judged OK: {shown}")
        if out.defects_flipped:
            parts.append(f"{out.defects_flipped} part(s) labelled as real defects would pass")
        apply, cancel = "Apply the label", "Do not apply"

        def answer(option: str) -> None:
            if option == apply:
                self._commit(req, out)
            else:
                self._revert("Label not applied; the model is unchanged.")

        s.ask(_question(f"'{KIND_TEXT[req['kind']]}' on {req['name']}: " + "; ".join(parts) + ". Apply it?",
                        (apply, cancel), cancel, answer))

    def _flips_to_ok(self, r: Rescored, req: dict) -> bool:
        s = self.session
        rec = s.results.get(r.result_id)
        if rec is None or rec.verdict != "NG" or judge(r.score, s.image_threshold) != "OK":
            return False
        # the labelled part itself passing is what a false alarm / part-OK label asks for
        return not (r.result_id == req["result_id"] and req["kind"] in ("false_alarm", "image_ok"))

    def _revert(self, message: str, is_error: bool = False) -> None:
        """Give the learner its previous model back (the label never took effect)."""
        s, learner = self.session, self.learner

        def done(_out: ModelOutcome) -> None:
            self._pending = False

        s.submit(partial(undo_job, learner, []), on_returned=done, on_failed=self._on_failed)
        (s.error if is_error else s.status).emit(message)

    def _commit(self, req: dict, out: LabelOutcome) -> None:
        s, rec = self.session, out.record
        kind, mask = req["kind"], req["mask"]
        try:
            path, sha = req["path"], out.sha256
            if path is None:  # a live frame: keep the image so the label can be replayed
                path, sha = self._keep_frame(req["image"])
            # the OK set is locked in operator mode: the label teaches the model, an engineer adds the part
            adds_ok = (kind == "image_ok" and bool(req["path"]) and req["path"] not in s.recipe.ok_paths
                       and s.role == ENGINEER)
            label = Label(image_path=path, image_sha256=sha, kind=kind, added_ok=adds_ok,
                          model_id=self.current_model_id, operator=self.operator,
                          region=RegionShape.from_mask(mask) if mask is not None else None,
                          map_size=int(req["before"][1].shape[0]), score=float(rec.score_before),
                          score_after=float(rec.score_after),
                          reweight=bool(self.learner.reweight and out.detector.model.supports_channel_weights))
            label_id = self.store().add(label)  # committed (WAL, synchronous=FULL) before it returns
        except (sqlite3.Error, OSError, ValueError, OkngError) as exc:
            self._revert(f"Label NOT saved ({exc}); the model change was reverted.", is_error=True)
            return
        self._pending = False
        s.mark_dirty()
        self._scores[label_id] = (rec.score_before, rec.score_after)
        out.detector.applied_labels = (*out.detector.applied_labels, label_id)
        added = None
        if adds_ok and req["path"] not in s.recipe.ok_paths:
            added = req["path"]
            s.recipe.ok_paths.append(added)
            s.ok_paths_changed.emit(s.ok_paths)
        self._push_step(_Step(label_id, req["result_id"], req["before"], added))
        changed = self._apply_model(out.detector, out.rescored, req["result_id"], out.labelled, req["newer_from"])
        held_back = self._held_back_text(rec.guard, rec.weights, req.get("protected_ids", []))
        if rec.weights is not None or rec.guard is not None:
            self.weights_changed.emit(rec.weights if rec.weights is not None else self.learner.held_weights())
        self.weights_held_back.emit(held_back)  # "" clears an earlier label's note
        said = [f"Label #{label_id} saved: {KIND_TEXT[kind]} on {req['name']} — score "
                f"{rec.score_before:.2f} → {rec.score_after:.2f} (Ctrl+Z to undo)"]
        if changed:
            shown = ", ".join(f"{r.name} {r.changed_from} → {r.verdict}" for r in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            said.append(f"Verdicts changed: {shown}{more} (marked in the results)")
        labelled_rec = s.results.get(req["result_id"])
        if kind == "false_alarm" and labelled_rec is not None and labelled_rec.verdict == "NG":
            said.append(_still_ng_text(labelled_rec, req["mask"], s.image_threshold))
        if kind in ("defect", "image_ng") and labelled_rec is not None and labelled_rec.verdict == "OK":
            said.append("The part stays OK at this threshold: the label is kept (the feedback never accepts "
                        "what it shows), but only a lower threshold makes parts like it NG: an engineer's call")
        if held_back:
            said.append(held_back)
        if added is None and kind == "image_ok" and req["path"] and req["path"] not in s.recipe.ok_paths:
            said.append("Not added to the OK set (locked in operator mode): an engineer adds it")
        if rec.expected_false_alarm_rate is not None:
            said.append(f"Expected false alarms now {rec.expected_false_alarm_rate:.1%}")
        self.labels_changed.emit(self.rows())
        self.label_saved.emit(label_id)
        self.can_undo_changed.emit(True)
        s.status.emit(". ".join(said))

    def _held_back_text(self, guard: WeightGuard | None, weights: Any, protected_ids: list[int]) -> str:
        """What the reweighting guard held back and why, naming the parts it kept NG."""
        if guard is None or not guard.refused:
            return ""
        names = []
        for i in guard.parts:
            rec = self.session.results.get(protected_ids[i]) if i < len(protected_ids) else None
            if rec is not None:
                names.append(rec.name)
        why = []
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            why.append(f"{shown} (judged NG)")
        if guard.defects:
            why.append("a part labelled as a real defect")
        passed = " and ".join(why) or "a part judged NG"
        if guard.removed:
            return (f"Channel weights removed (back to 1): every lowering of the channels behind this label "
                    f"would pass {passed}")
        if weights is not None and weights.strength is not None:
            return (f"Channel weights learnt at {weights.strength:g} of full strength: a stronger change "
                    f"would pass {passed}")
        return f"Channel weights left as they were: lowering the channels behind this label would pass {passed}"

    def _keep_frame(self, image: np.ndarray | None) -> tuple[str, str]:
        if image is None:
            raise OkngError("the image of this live frame is gone")
        folder = self.store_path.with_suffix(".images")
        folder.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OkngError("could not encode the live frame")
        target = folder / f"frame-{time.strftime('%Y%m%dT%H%M%S')}-{len(self._steps)}.png"
        write_bytes_atomic(target, png.tobytes())
        return str(target), file_sha256(target)

    def _push_step(self, step: _Step) -> None:
        self._steps.append(step)
        del self._steps[: -self.learner.max_undo]  # the learner keeps this many snapshots

    def _apply_model(self, detector: Detector, rescored: list[Rescored], result_id: int | None,
                     labelled: Any, newer_from: int | None = None) -> list:
        """The new model becomes current (operator's thresholds stay); every re-judged result
        takes its new score, and remembers a verdict the change flipped. Returns the results
        whose verdict changed, other than the labelled one."""
        s = self.session
        s.detector = detector  # set_detector below re-judges; first update the scores
        for r in rescored:
            rec = s.results.get(r.result_id)
            if rec is not None:
                rec.score, rec.anomaly_map = r.score, r.anomaly_map
        labelled_rec = s.results.get(result_id)
        if labelled_rec is not None and labelled is not None:
            labelled_rec.score, labelled_rec.anomaly_map = labelled.score, labelled.anomaly_map
        before = {rec.id: rec.verdict for rec in s.results}
        s.set_detector(detector, s.image_threshold, s.pixel_threshold)
        changed = []
        for rec in s.results:
            if rec.verdict != before[rec.id]:
                rec.changed_from = before[rec.id]
                if rec.id != result_id:
                    changed.append(rec)
        s.results_changed.emit()
        if labelled_rec is not None:
            s.show_result(labelled_rec.id)
        if newer_from is not None:  # added after the job took its list (an inspection ran
            # meanwhile): they carry the old model's scores, scored again
            s.rescore_stale({rec.id for rec in s.results if rec.id >= newer_from and rec.embedding is not None})
        return changed

    # -- undo, reset ------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._steps)

    def undo_last(self) -> None:
        if not self._steps:
            self.session.status.emit("Nothing to undo.")
            return
        if self._busy():
            return
        s, step = self.session, self._steps[-1]
        self._pending = True
        newer_from = s.results.next_id
        s.submit(partial(undo_job, self.learner, s.results.with_embeddings()),
                  on_returned=lambda out: self._on_undone(step, out, newer_from), on_failed=self._on_failed)

    def _on_undone(self, step: _Step, out: ModelOutcome, newer_from: int | None = None) -> None:
        s = self.session
        self._pending = False
        self._steps.pop()
        s.mark_dirty()
        if step.label_id is not None:
            try:
                self.store().undo(step.label_id, by=self.operator)
            except sqlite3.Error as exc:
                s.error.emit(f"Could not mark label #{step.label_id} undone in the label store: {exc}")
        if step.added_ok_path is not None and step.added_ok_path in s.recipe.ok_paths:
            s.recipe.ok_paths.remove(step.added_ok_path)
            s.ok_paths_changed.emit(s.ok_paths)
        rescored = [r for r in out.rescored if r.result_id != step.result_id]
        self._apply_model(out.detector, rescored, None, None, newer_from)
        r = s.results.get(step.result_id)
        if r is not None and step.before is not None:
            # the model is exactly the one that produced these values: restore them bit for bit
            shown_verdict = r.verdict
            r.score, r.anomaly_map, _ = step.before
            r.verdict = judge(r.score, s.image_threshold)
            r.changed_from = shown_verdict if r.verdict != shown_verdict else None
            s.results_changed.emit()
            s.show_result(r.id)
        self.weights_changed.emit(self.learner.held_weights())
        self.labels_changed.emit(self.rows())
        self.can_undo_changed.emit(bool(self._steps))
        what = "weights reset" if step.label_id is None else f"label #{step.label_id}"
        s.status.emit(f"Undone: {what}" + (f"; {r.name} scores {r.score:.2f} again" if r is not None else ""))

    def reset_weights(self) -> None:
        if self._busy() or not self.session._engineer_only("reset the channel weights"):
            return
        s = self.session
        rec = s.shown
        before = (rec.score, rec.anomaly_map, rec.verdict) if rec is not None else None
        self._pending = True
        newer_from = s.results.next_id

        def done(out: ModelOutcome) -> None:
            self._pending = False
            self._push_step(_Step(None, rec.id if rec is not None else None, before))
            self._apply_model(out.detector, out.rescored, None, None, newer_from)
            self.weights_changed.emit(None)
            self.can_undo_changed.emit(True)
            s.mark_dirty()  # the model changed: quitting asks (found trying the station: it did not)
            s.status.emit("Channel weights reset (Ctrl+Z to undo). A refit replays the labels, and those made "
                          "with Learn channel weights on may lower channels again: withdraw them to keep it off")

        s.submit(partial(reset_weights_job, self.learner, s.results.with_embeddings()), on_returned=done,
                  on_failed=self._on_failed)

    # -- withdrawing a label ----------------------------------------------------------------
    def withdraw(self, label_id: int) -> None:
        """Take a label out of what the station learns from (an engineer's correction of a
        wrong label, at any time after it was made): the store marks it undone, so no refit
        replays it. The last label is undone at once, exactly (:meth:`undo_last`); an older
        one stays in the current model until the next fit, and the panel says so."""
        if not self.session._engineer_only("withdraw a label"):
            return
        if self._steps and self._steps[-1].label_id == label_id:
            self.undo_last()
            return
        if self._set_active(label_id, False):
            self.session.status.emit(f"Label #{label_id} withdrawn: " + (
                "the current model still holds it until you fit again (F5)" if self._held(label_id)
                else "no fit will replay it") + self._ok_set_follows(label_id, False))

    def restore(self, label_id: int) -> None:
        """A withdrawn (or undone) label active again: the next fit replays it."""
        if self.session._engineer_only("restore a label") and self._set_active(label_id, True):
            self.session.status.emit(f"Label #{label_id} restored" + (
                "" if self._held(label_id) else ": the next fit (F5) replays it into the model")
                + self._ok_set_follows(label_id, True))

    def _ok_set_follows(self, label_id: int, active: bool) -> str:
        """A "part is OK" that put its image into the OK set takes it out again when withdrawn
        (else the next fit would train on a part nobody vouches for any more) and puts it back
        when restored; what changed, as the end of a status line."""
        s = self.session
        try:
            labels = self.store().labels(include_undone=True)
        except (sqlite3.Error, OSError, ValueError):
            return ""
        lab = next((x for x in labels if x.id == label_id), None)
        if lab is None or not lab.added_ok:
            return ""
        vouched = any(x.kind == "image_ok" and x.image_path == lab.image_path and x.undone_at is None
                      and x.id != label_id for x in labels)  # another active "part is OK" on it
        if not active and lab.image_path in s.recipe.ok_paths and not vouched:
            s.recipe.ok_paths.remove(lab.image_path)
        elif active and lab.image_path not in s.recipe.ok_paths:
            s.recipe.ok_paths.append(lab.image_path)
        else:
            return ""
        s.ok_paths_changed.emit(s.ok_paths)
        return "; its image " + ("is back in" if active else "left") + " the OK set"

    def _set_active(self, label_id: int, active: bool) -> bool:
        """Mark a stored label active (replayed by fits) or not; False if it could not be."""
        s = self.session
        if self._pending:
            s.status.emit("Still learning from the previous label…")
            return False
        if s._still_saving():
            return False
        try:
            if active:
                self.store().redo(label_id)
            else:
                self.store().undo(label_id, by=self.operator)
        except (sqlite3.Error, OSError) as exc:
            s.error.emit(f"Could not {'restore' if active else 'withdraw'} label #{label_id}: {exc}")
            return False
        s.mark_dirty()
        self.labels_changed.emit(self.rows())
        return True

    def _held(self, label_id: int) -> bool:
        det = self.session.detector
        return det is not None and label_id in det.applied_labels

    # -- list, export -----------------------------------------------------------------------
    def rows(self) -> list[LabelRow]:
        if self._store is None and not self.store_path.exists():
            return []  # do not create a file just to list nothing
        try:
            labels = self.store().labels(include_undone=True)
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.warning("label store unreadable: %s", exc)
            return []
        det = self.session.detector
        in_model = set(det.applied_labels) if det is not None else set()
        out = []
        for lab in labels:
            before, after = self._scores.get(lab.id, (lab.score, lab.score_after))
            out.append(LabelRow(lab.id, lab.created_at or 0.0, Path(lab.image_path).name, lab.kind, before, after,
                                lab.undone_at is not None, lab.id in in_model, lab.undone_by or "", lab.undone_at))
        return out

    def export(self, path: str) -> None:
        fmt = Path(path).suffix.lower().lstrip(".")
        if fmt not in ("csv", "json"):  # "labels.txt" silently got CSV
            self.session.error.emit(f"Export refused: name the file .csv or .json ({Path(path).name} is "
                                    "neither); nothing was written")
            return
        try:
            st = self.store()
            text = st.export_json() if fmt == "json" else st.export_csv()
            write_bytes_atomic(path, text.encode("utf-8"))
        except (OkngError, sqlite3.Error, OSError) as exc:
            self.session.error.emit(f"Export failed: {exc}")
            return
        self.session.status.emit(f"Labels exported to {path}")



def _still_ng_text(rec: Any, mask: np.ndarray | None, threshold: float | None) -> str:
    """Why a part marked as a false alarm is still NG (found trying the station: a 3-pixel spot
    at the image's edge kept it NG, and nothing said so)."""
    text = f"The part stays NG: score {rec.score:.2f}" + ("" if threshold is None else f" > threshold {threshold:.2f}")
    m = rec.anomaly_map
    if mask is None or m is None or mask.shape != m.shape:
        return text
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    if mask[r, c]:
        return text + ", still from the marked region (one label lowers it; label it again, or an engineer " \
                      "sets the threshold)"
    return text + (f", now from another spot ({_where_in_image(r, c, m.shape, rec.image)}): click it "
                   "and label it too if it is also a false alarm")


def _where_in_image(row: int, col: int, map_shape: tuple[int, ...], image: np.ndarray | None) -> str:
    """A map position as an operator finds it on screen: the part of the image it is in, and
    its pixel in the image (the map may be 224 × 224 over a 300 × 300 image: found trying the
    station, "row 12, column 200 of 224 × 224" sent an operator counting map cells)."""
    h, w = map_shape[:2]
    fy, fx = (row + 0.5) / h, (col + 0.5) / w
    vertical = "top" if fy < 1 / 3 else "bottom" if fy > 2 / 3 else "middle"
    horizontal = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else "centre"
    area = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    if image is None:
        return f"{area} of the image"
    ih, iw = image.shape[:2]
    return f"{area} of the image, near x {int(fx * iw)}, y {int(fy * ih)}"


def _question(text: str, options: tuple[str, ...], default: str, on_answer) -> Question:
    return Question("Label would pass NG parts", text, options, default, on_answer)


def _model_id(path: str | None, det: Detector | None) -> str:
    """A readable model identity: the model file name and its time, or the fit time."""
    if path and Path(path).is_file():
        t = time.strftime("%Y%m%dT%H%M%S", time.localtime(Path(path).stat().st_mtime))
        return f"{Path(path).name}@{t}"
    n = det.model.n_samples if det is not None else 0
    return f"fit@{time.strftime('%Y%m%dT%H%M%S')}/{n}ok"
