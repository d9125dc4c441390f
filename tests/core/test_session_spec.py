"""InspectionSession, what the station tells and keeps (issue 18: the gaps mutation testing found).

Specifications of the session's refusals, messages and less common paths: a recipe that cannot
be opened, the thresholds an operator may not move, a cancelled inspection, a live frame that is
labelled, the capture folder, the labels of a recipe opened from disk; and (round 6) the words
of the tiling, live-stop and threshold questions, what a label adds to the OK images and whom it
protects, a label or undo at a time, replayed labels and the thresholds, the model's identity,
the recipe's feedback radius, kept images, a capture's default of one frame.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.jobs import CancelToken, InlineExecutor, JobCallbacks, deliver, drive
from core.labels import LabelStore
from core.results_log import ResultsLog
from core.recipes import model_path_for
from core.session import InspectionSession


@pytest.fixture
def session(recipe_session):
    s = recipe_session
    s.said = s.statuses
    s.start_fit()
    assert s.detector is not None and not s.errors
    return s


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for f in frames:
        out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out.release()


def _camera_of_ok_parts(s, tmp_path: Path) -> Path:
    """A four-frame video of the session's first OK part: a camera to capture OK frames from."""
    frame = cv2.cvtColor(cv2.imread(s.ok_paths[0]), cv2.COLOR_BGR2RGB)
    video = tmp_path / "cam.avi"
    _write_video(video, [frame] * 4)
    return video


class CancelAfter(InlineExecutor):
    """Runs a job inline like InlineExecutor, and cancels it after ``n`` delivered items:
    what pressing Esc during an inspection does."""

    def __init__(self, n: int) -> None:
        self.n = n

    def submit(self, job, callbacks=None, replace=False):
        token, cb, seen = CancelToken(), callbacks or JobCallbacks(), []

        def report(kind, payload):
            deliver(cb, kind, payload)
            if kind == "item":
                seen.append(payload)
                if len(seen) >= self.n:
                    token.cancel()

        drive(job, token, report)
        return token


# -- refusals and their messages -------------------------------------------------------------
def test_an_operator_cannot_move_the_thresholds_and_the_controls_snap_back(session):
    s = session
    image, pixel = s.image_threshold, s.pixel_threshold
    assert s.set_pin("4711")
    s.lock()
    told = []
    s.thresholds_changed.connect(lambda i, p: told.append((i, p)))
    s.set_thresholds(image * 2, pixel * 2)
    assert told == [(image, pixel)]  # the sliders are told the values that still hold
    assert (s.image_threshold, s.pixel_threshold) == (image, pixel)
    assert (s.detector.thresholds.image, s.detector.thresholds.pixel) == (image, pixel)
    assert "move the thresholds" in s.errors[-1]


def test_a_file_that_is_not_a_recipe_is_refused_with_its_reason_and_changes_nothing(session, tmp_path):
    s = session
    bad = tmp_path / "broken.okng-recipe"
    bad.write_bytes(b"this is not a recipe")
    recipe, det = s.recipe, s.detector
    s.open_recipe(bad)
    assert len(s.errors) == 1 and s.errors[0].startswith("Cannot open recipe: ")
    assert str(bad) in s.errors[0]  # the reason names the file
    assert s.recipe is recipe and s.detector is det


def test_a_recipe_saved_before_any_fit_opens_and_asks_for_one(tmp_path, part_images, tiny_config):
    first = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "l1", captures_dir=tmp_path / "c1")
    first.new_recipe("unfitted", tiny_config, part_images[0][:3])
    path = tmp_path / "unfitted.okng-recipe"
    assert first.save_recipe(path)
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "l2", captures_dir=tmp_path / "c2")
    said, errors = [], []
    s.status.connect(said.append)
    s.error.connect(errors.append)
    s.open_recipe(path)
    assert not errors and s.detector is None and s.ok_paths == part_images[0][:3]
    assert said[-1] == "Recipe unfitted opened; no fitted model yet — press Fit (F5)"


def test_a_label_says_what_it_learns_from_and_on_which_part(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:1])
    s.said.clear()
    s.labels.mark_image("image_ng")
    name = Path(part_images[1][0]).name
    assert f"Learning from 'part NG' on {name}…" in s.said
    assert len(s.labels.rows()) == 1


def _twin_ng_parts_just_above_the_threshold(s, part_images):
    """The same defective part inspected twice, the threshold just below its score, the
    first one shown: a label on it would pass its twin."""
    ng = part_images[1][0]
    s.inspect_paths([ng, ng])
    first, twin = list(s.results)[-2:]
    s.set_thresholds(first.score * (1 - 1e-4), s.pixel_threshold)
    s.show_result(first.id)
    return first, twin


def test_refusing_a_label_says_the_model_is_unchanged_as_a_status_not_an_error(session, part_images):
    s = session
    first, twin = _twin_ng_parts_just_above_the_threshold(s, part_images)
    s.question.connect(lambda q: q.answer("Do not apply"))
    s.errors.clear()
    s.said.clear()
    s.labels.mark_image("image_ok")
    assert s.said[-1] == "Label not applied; the model is unchanged."
    assert not s.errors and twin.verdict == "NG"


# -- a cancelled inspection ------------------------------------------------------------------
def test_a_cancelled_inspection_keeps_what_was_scored_and_reports_what_was_skipped(session, part_images, tmp_path):
    s = session
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"not an image")
    ok = part_images[0]
    s.executor = CancelAfter(3)  # the unreadable file and two images, then Esc
    s.said.clear()
    counted = []
    s.shift.counters_changed.connect(counted.append)
    s.inspect_paths([str(unreadable), ok[0], ok[1], ok[2], ok[3], ok[4]])
    assert s.said[-1] == "Inspection cancelled"
    assert [r.path for r in s.results] == [ok[0], ok[1]]
    assert len(s.errors) == 1 and s.errors[0].startswith("1 image(s) were skipped")
    assert str(unreadable) in s.errors[0]
    assert counted and counted[-1].total == 2  # the shift counters are sent when the run ends


# -- live frames, captures ---------------------------------------------------------------------
def test_a_live_frame_can_be_labelled_and_its_image_is_kept_beside_the_labels(session, tmp_path):
    s = session
    frame = cv2.cvtColor(cv2.imread(s.ok_paths[0]), cv2.COLOR_BGR2RGB)
    video = tmp_path / "line.avi"
    _write_video(video, [frame] * 2)
    s.start_live("video", str(video))  # inline: runs to the end of the file
    live = list(s.results)[-1]
    assert live.path is None and live.image is not None  # a live frame has no file
    s.show_result(live.id)
    s.question.connect(lambda q: q.answer("Apply the label"))  # should the other frame be NG and flip
    s.labels.mark_image("image_ok")
    assert not s.errors
    with LabelStore(s.labels.store_path) as store:
        (lab,) = store.labels()
    kept = Path(lab.image_path)
    assert kept.parent == s.labels.store_path.with_suffix(".images")
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(kept)), cv2.COLOR_BGR2RGB), live.image)


def test_captured_ok_frames_go_to_the_data_folder_until_the_recipe_is_saved_then_beside_it(session, tmp_path):
    s = session
    video = _camera_of_ok_parts(s, tmp_path)
    before = list(s.ok_paths)
    s.capture_ok("video", str(video), 2)
    folder = tmp_path / "captures" / "parts"
    assert s.capture_folder() == folder
    added = s.ok_paths[len(before):]
    assert len(added) == 2 and all(Path(p).parent == folder and Path(p).is_file() for p in added)
    assert f"into {folder}" in " ".join(s.said)
    s.save_recipe(tmp_path / "line" / "station.okng-recipe")
    assert s.capture_folder() == tmp_path / "line" / "station.captures"


# -- labels of a recipe opened from disk -------------------------------------------------------
def test_the_labels_of_a_reopened_recipe_are_listed_before_anything_else_opens_their_store(
        session, part_images, tmp_path, tiny_config):
    s = session
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    path = tmp_path / "saved.okng-recipe"
    assert s.save_recipe(path)
    s.labels.close_store()
    other = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "other", captures_dir=tmp_path / "oc")
    listed = []
    other.labels.labels_changed.connect(listed.append)
    other.open_recipe(path)
    assert other.labels.store_path.exists()
    rows = listed[-1]  # the list shown once the recipe is open, read from the file on disk
    assert [(r.kind, r.image_name) for r in rows] == [("image_ng", Path(part_images[1][0]).name)]
    assert [(r.kind, r.image_name) for r in other.labels.rows()] == [("image_ng", Path(part_images[1][0]).name)]


# -- found by mutation round 6 ------------------------------------------------------------------
class Holding(InlineExecutor):
    """Takes a job and runs nothing yet: an engine thread still busy with it."""

    def __init__(self) -> None:
        self.jobs = []

    def submit(self, job, callbacks=None, replace=False):
        self.jobs.append(job)
        return CancelToken()


def test_the_next_fits_tiling_is_told_in_words(tmp_path, part_images, tiny_config):
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    said = []
    s.status.connect(said.append)
    s.new_recipe("parts", tiny_config, part_images[0])
    s.set_tiling("auto")
    assert said[-1] == "Next fit: automatic tiling (press F5 to fit)"
    s.set_tiling(64)
    assert said[-1] == "Next fit: 64-px tiles (press F5 to fit)"
    s.set_tiling(None)
    assert said[-1] == "Next fit: whole images (press F5 to fit)"


def test_stopping_live_inspection_says_so(session, tmp_path):
    s = session
    frame = cv2.cvtColor(cv2.imread(s.ok_paths[0]), cv2.COLOR_BGR2RGB)
    video = tmp_path / "line.avi"
    _write_video(video, [frame] * 3)
    s.executor = CancelAfter(1)  # Space after the first frame
    s.start_live("video", str(video))
    assert s.said[-1] == "Live inspection stopped" and not s.live


def test_hand_set_thresholds_and_a_refit_ask_with_both_pairs_named(session):
    s = session
    s.set_thresholds(s.image_threshold * 3, s.pixel_threshold * 2)
    mine = (s.image_threshold, s.pixel_threshold)
    asked = []
    s.question.connect(lambda q: (asked.append(q), q.answer("Use the new calibration")))
    s.start_fit()
    (q,) = asked
    th = s.detector.thresholds  # the new calibration, chosen
    assert q.title == "Thresholds after refit"
    assert q.text == (f"You set the thresholds by hand (image {mine[0]:.4g}, pixel {mine[1]:.4g}). "
                      f"The new model calibrates to image {th.image:.4g}, pixel {th.pixel:.4g} at the target "
                      "false-alarm rate. Keep yours?")


def test_a_label_that_would_pass_other_ng_parts_ends_its_question_with_apply_it(session, part_images):
    s = session
    first, twin = _twin_ng_parts_just_above_the_threshold(s, part_images)
    asked = []
    s.question.connect(asked.append)
    s.labels.mark_image("image_ok")
    (q,) = asked
    assert q.text == f"'part OK' on {first.name}: 1 part(s) judged NG would be judged OK: {twin.name}. Apply it?"


def test_a_part_ok_label_adds_the_image_to_the_ok_images_and_a_part_ng_label_does_not(session, part_images):
    s = session
    ok_before = list(s.ok_paths)
    ng = part_images[1]
    s.inspect_paths([ng[0]])
    s.labels.mark_image("image_ng")
    assert s.ok_paths == ok_before and len(s.labels.rows()) == 1
    s.inspect_paths([ng[1]])
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert s.ok_paths == [*ok_before, ng[1]] and len(s.labels.rows()) == 2


def test_a_false_alarm_that_makes_its_own_part_pass_is_applied_without_asking(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:1])
    rec = list(s.results)[-1]
    s.set_thresholds(rec.score * (1 - 1e-4), float(np.percentile(rec.anomaly_map, 90)))
    assert rec.verdict == "NG"
    peak = np.unravel_index(int(np.argmax(rec.anomaly_map)), rec.anomaly_map.shape)
    assert s.labels.select_at(int(peak[0]), int(peak[1]))
    asked = []
    s.question.connect(asked.append)
    s.labels.mark_region("false_alarm")
    assert asked == [] and len(s.labels.rows()) == 1  # the part passing is what the label asks for
    assert rec.verdict == "OK"


def _three_judged_ng(s, paths):
    """Inspect the first three parts and set the threshold just under their scores: all NG."""
    s.inspect_paths(paths[:3])
    recs = list(s.results)[-3:]
    s.set_thresholds(min(r.score for r in recs) * (1 - 1e-4), s.pixel_threshold)
    assert all(r.verdict == "NG" for r in recs)
    return recs


def test_a_label_protects_every_other_part_judged_ng(session, part_images):
    s = session
    ng = part_images[1]
    recs = _three_judged_ng(s, ng)
    s.show_result(recs[0].id)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert len(s.labels.learner.protected_embeddings) == 2  # the other two; the clicked one may pass


def test_a_label_whose_reweighting_was_held_back_names_the_parts_it_kept_ng(session, part_images, monkeypatch):
    from core.feedback import FeedbackLearner, WeightGuard

    s = session
    ng = part_images[1]
    recs = _three_judged_ng(s, ng)
    s.labels.set_reweight(True)
    # the second of the parts it protects (the clicked one is not protected) stopped strength 1 and 0.5
    monkeypatch.setattr(FeedbackLearner, "_reweight", lambda self: (None, WeightGuard((1.0, 0.5), 0, (1,))))
    held, weights = [], []
    s.labels.weights_held_back.connect(held.append)
    s.labels.weights_changed.connect(weights.append)
    s.show_result(recs[0].id)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.said.clear()
    s.labels.mark_image("image_ok")
    assert held == ["Channel weights left as they were: lowering the channels behind this label would pass "
                    f"{recs[2].name} (judged NG)"]
    assert weights == [None]  # the model holds no weights: the panel says so, with the note
    assert held[0] in s.said[-1]


def test_a_label_names_the_other_verdicts_it_changed(session, part_images):
    s = session
    ng = part_images[1]
    s.inspect_paths([ng[0], ng[0]])  # the same part twice: what the label accepts passes the copy too
    first, copy = list(s.results)[-2:]
    s.set_thresholds(min(first.score, copy.score) * (1 - 1e-4), s.pixel_threshold)
    assert first.verdict == copy.verdict == "NG"
    s.show_result(first.id)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.said.clear()
    s.labels.mark_image("image_ok")
    assert copy.verdict == "OK" and copy.changed_from == "NG"
    assert f"Verdicts changed: {copy.name} NG → OK (marked in the results)" in s.said[-1]


def test_in_operator_mode_part_is_ok_teaches_the_model_but_leaves_the_locked_ok_set(session, part_images):
    s = session
    part = part_images[1][0]
    s.inspect_paths([part])
    assert s.set_pin("4711")
    s.lock()
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.said.clear()
    s.labels.mark_image("image_ok")
    (row,) = s.labels.rows()
    assert row.kind == "image_ok" and row.in_model  # the model learnt it
    assert part not in s.ok_paths  # the OK set is the engineer's
    assert "Not added to the OK set (locked in operator mode): an engineer adds it" in s.said[-1]
    s.labels.withdraw(row.id)  # and nothing to take out of the OK set later
    assert part not in s.ok_paths


def test_a_real_defect_label_on_a_part_judged_ok_says_the_verdict_stays(session, part_images):
    s = session
    s.inspect_paths(part_images[0][:1])  # a good part
    (rec,) = list(s.results)
    s.set_thresholds(rec.score * 1.5, s.pixel_threshold)  # judged OK
    assert rec.verdict == "OK"
    s.said.clear()
    s.labels.mark_image("image_ng")
    assert rec.verdict == "OK" and "The part stays OK at this threshold" in s.said[-1]


def test_a_part_an_active_label_accepts_is_not_protected_by_the_next_label(session, part_images):
    """As in a refit's replay: a part that an active "part is OK" label accepts may pass under
    channel weights; protecting it would hold every later label's weights back for a good part."""
    from core.labels import Label

    s = session
    ng = part_images[1]
    recs = _three_judged_ng(s, ng)
    # accepted by a label of an earlier session, not in this model yet: the part still shows NG
    s.labels.store().add(Label(ng[0], "ab" * 32, "image_ok", "earlier", operator="ana"))
    # a false alarm accepts one region only: that part may be NG for another, it stays protected
    s.labels.store().add(Label(ng[2], "cd" * 32, "false_alarm", "earlier", operator="ana"))
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.show_result(recs[1].id)
    s.labels.mark_image("image_ng")
    protected = s.labels.learner.protected_embeddings  # the labelled part and recs[2]
    assert len(protected) == 2 and not any(torch.equal(p, recs[0].embedding.to(torch.float16)) for p in protected)


def test_while_an_undo_runs_no_other_label_or_undo_starts(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    s.executor = Holding()
    s.labels.undo_last()
    assert len(s.executor.jobs) == 1
    s.said.clear()
    s.labels.mark_image("image_ng")
    s.labels.undo_last()
    assert len(s.executor.jobs) == 1 and "Still learning from the previous label…" in s.said


def test_inspected_images_are_kept_with_their_results(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:1])
    rec = list(s.results)[-1]
    assert rec.image is not None  # shown and labelled without reading the file again
    assert np.array_equal(rec.image, cv2.cvtColor(cv2.imread(part_images[1][0]), cv2.COLOR_BGR2RGB))


def test_a_capture_takes_one_frame_unless_told_how_many(session, tmp_path):
    s = session
    video = _camera_of_ok_parts(s, tmp_path)
    before = len(s.ok_paths)
    s.capture_ok("video", str(video))
    assert len(s.ok_paths) == before + 1


def test_after_a_refit_replays_the_labels_the_thresholds_hold_and_labelling_goes_on(session, part_images):
    s = session
    ng = part_images[1]
    s.inspect_paths(ng[:1])
    s.labels.mark_image("image_ng")
    s.set_thresholds(s.image_threshold * 3, s.pixel_threshold * 2)
    mine = (s.image_threshold, s.pixel_threshold)
    s.start_fit()  # nobody to ask: the hand-set thresholds stay; the label is replayed
    assert s.detector.applied_labels == (s.labels.rows()[0].id,)
    assert (s.image_threshold, s.pixel_threshold) == mine
    assert (s.detector.thresholds.image, s.detector.thresholds.pixel) == mine
    s.inspect_paths(ng[1:2])
    s.labels.mark_image("image_ng")
    assert len(s.labels.rows()) == 2 and not s.errors


def test_a_models_identity_is_its_fit_time_or_its_files_name_and_time(session, tmp_path):
    import re
    import time

    s = session
    assert re.fullmatch(rf"fit@\d{{8}}T\d{{6}}/{s.detector.model.n_samples}ok", s.labels.current_model_id)
    path = tmp_path / "id.okng-recipe"
    assert s.save_recipe(path)
    other = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "l2", captures_dir=tmp_path / "c2")
    other.open_recipe(path)
    model = Path(other.recipe.model_path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(model.stat().st_mtime))
    assert other.labels.current_model_id == f"{model.name}@{stamp}"


def test_the_recipes_feedback_radius_reaches_the_feedback_memory(session, part_images):
    s = session
    s.set_station_setting("feedback_radius", 3)
    s.start_fit()  # a new learner, with the recipe's settings
    s.inspect_paths(part_images[1][:1])
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert not s.errors and s.detector.memory is not None and s.detector.memory.radius == 3


# -- saving over another recipe (round 11) ---------------------------------------------------
def _recipe_saved_with_one_label(s, part_images, tmp_path) -> Path:
    """Station ``s`` (operator "ana") inspects a part, labels it and saves its recipe in a
    shared folder: the recipe another station will save over."""
    path = tmp_path / "shared" / "station.okng-recipe"
    path.parent.mkdir()
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    assert s.save_recipe(path)
    return path


def _other_station_with_a_label(tmp_path, tiny_config, part_images):
    """A second station (operator "ben") with its own recipe, two inspections and one label:
    (session, what it said, its errors)."""
    t = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "l2", captures_dir=tmp_path / "c2")
    said, errors = [], []
    t.status.connect(said.append)
    t.error.connect(errors.append)
    t.new_recipe("other", tiny_config, part_images[0])
    t.operator = "ben"
    t.start_fit()
    t.inspect_paths(part_images[1][:2])
    t.labels.mark_image("image_ng")
    return t, said, errors


def test_saving_over_another_recipe_carries_this_sessions_labels_and_log_and_sets_the_old_ones_aside(
        session, part_images, tmp_path, tiny_config):
    """Save as… onto an existing recipe: the labels and results log beside it become this
    session's (what its saved model holds and what a refit replays); the replaced recipe's
    own stores are renamed aside, whole, never merged and never silently kept in place."""
    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    assert len(LabelStore(path.with_suffix(".labels.sqlite")).labels()) == 1

    t, said, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    t.show_result(list(t.results)[0].id)
    t.labels.mark_image("image_ng")
    assert t.save_recipe(path)
    rows = LabelStore(path.with_suffix(".labels.sqlite")).labels()
    assert [r.operator for r in rows] == ["ben", "ben"]  # this session's two, not the old one
    aside = sorted(path.parent.glob("station.labels.sqlite.replaced-*"))
    assert len(aside) == 1 and [r.operator for r in LabelStore(aside[0]).labels()] == ["ana"]
    assert any(str(aside[0]) in line for line in said)

    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 2  # t's two inspections
    old_log = [p for p in path.parent.glob("station.results.sqlite.replaced-*")
               if not p.name.endswith(("-wal", "-shm"))]
    assert len(old_log) == 1 and len(ResultsLog(old_log[0]).entries()) == 1


# -- withdrawing a label (round 11) ----------------------------------------------------------
def test_an_engineer_withdraws_an_older_label_and_the_next_fit_no_longer_replays_it(session, part_images):
    """A wrong label found later (the model refitted or reopened since, no undo left) is
    withdrawn: the store keeps it as undone, the panel shows it still in the current model
    until a fit, and the fit replays only the others; restored, the next fit replays it."""
    s = session
    s.inspect_paths(part_images[1][:2])
    first, second = list(s.results)[-2:]
    s.show_result(first.id)
    s.labels.mark_image("image_ng")
    s.show_result(second.id)
    s.labels.mark_image("image_ng")
    older, newer = [r.id for r in s.labels.rows()]
    s.start_fit()  # a refit: the undo history is gone, both labels replayed
    assert set(s.detector.applied_labels) == {older, newer} and not s.labels.can_undo
    s.labels.withdraw(older)
    row = {r.id: r for r in s.labels.rows()}[older]
    assert row.undone and row.in_model  # withdrawn, held by the current model until a fit
    assert row.undone_by == s.operator != "" and row.undone_at is not None  # who took it out, and when
    assert "still holds it until you fit again" in s.said[-1]
    s.start_fit()
    assert s.detector.applied_labels == (newer,)
    s.labels.restore(older)
    assert "the next fit (F5) replays it" in s.said[-1]
    s.start_fit()
    assert set(s.detector.applied_labels) == {older, newer}


def test_a_withdrawn_part_ok_takes_its_image_out_of_the_ok_set_and_a_restore_puts_it_back(session, part_images):
    """"Part is OK" puts the part into the OK set; withdrawn later (not the last label), it
    leaves the OK set again, so the next fit does not train on a part nobody vouches for;
    restored, it is back. A part that was in the OK set before its label stays there."""
    s = session
    s.inspect_paths(part_images[1][:2])
    first, second = list(s.results)[-2:]
    s.show_result(first.id)
    s.labels.mark_image("image_ok")
    assert first.path in s.ok_paths
    s.show_result(second.id)
    s.labels.mark_image("image_ng")  # a newer label: withdrawing the first is not an undo
    older = s.labels.rows()[0].id
    s.labels.withdraw(older)
    assert first.path not in s.ok_paths and "left the OK set" in s.said[-1]
    s.start_fit()
    assert first.path not in s.ok_paths
    s.labels.restore(older)
    assert first.path in s.ok_paths and "is back in the OK set" in s.said[-1]
    ok_before = list(s.ok_paths)
    s.inspect_paths(ok_before[:1])
    s.labels.mark_image("image_ok")  # a part already in the OK set
    s.show_result(second.id)
    s.labels.mark_image("image_ng")
    s.labels.withdraw(s.labels.rows()[-2].id)
    assert s.ok_paths == ok_before


def test_a_withdrawn_part_ok_leaves_its_image_in_the_ok_set_while_another_part_ok_vouches_for_it(
        session, part_images):
    s = session
    s.inspect_paths(part_images[1][:2])
    first, second = list(s.results)[-2:]
    s.show_result(first.id)
    s.labels.mark_image("image_ok")  # puts it into the OK set
    s.show_result(first.id)
    s.labels.mark_image("image_ok")  # the same part said OK again: it is already there
    s.show_result(second.id)
    s.labels.mark_image("image_ng")
    s.labels.withdraw(s.labels.rows()[0].id)
    assert first.path in s.ok_paths and "OK set" not in s.said[-1]


def test_withdrawing_the_last_label_undoes_it_at_once_and_an_operator_cannot_withdraw(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:1])
    (rec,) = list(s.results)[-1:]
    before = rec.score
    s.labels.mark_image("image_ng")
    (label,) = [r.id for r in s.labels.rows()]
    s.labels.withdraw(label)  # the last label, still undoable: undone exactly, now
    assert s.detector.applied_labels == () and rec.score == before
    s.labels.mark_image("image_ng")
    s.start_fit()
    newest = max(r.id for r in s.labels.rows())
    assert s.set_pin("4711")
    s.lock()
    s.labels.withdraw(newest)
    assert "withdraw a label" in s.errors[-1]
    assert not {r.id: r for r in s.labels.rows()}[newest].undone


def test_a_recipe_is_not_saved_where_its_labels_cannot_follow(session, part_images, tmp_path):
    """Saving over a recipe whose labels store cannot be read (here: not a database) stops
    the save with the reason: a recipe saved there would replay that store's labels."""
    s = session
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    path = tmp_path / "station.okng-recipe"
    path.with_suffix(".labels.sqlite").write_bytes(b"not a database at all" * 100)
    before = s.recipe_path
    s.save_recipe(path)
    assert s.errors[-1].startswith("Recipe NOT saved: the labels could not be copied beside it")
    assert s.recipe_path == before and not path.exists() and not path.with_suffix(".okng").exists()


def _the_log_copy_fails(monkeypatch, error: OSError) -> None:
    """The results log's copy beside a recipe being saved raises ``error`` (a full disk);
    the labels still copy."""
    import core.session_carry as carry

    copy_store = carry.copy_store

    def fails_at_the_log(source, target, aside=None):
        if target.name.endswith(".results.sqlite"):
            raise error
        return copy_store(source, target, aside)

    monkeypatch.setattr(carry, "copy_store", fails_at_the_log)


def test_a_save_stopped_by_the_results_log_puts_the_labels_beside_the_old_recipe_back(
        session, part_images, tmp_path, tiny_config, monkeypatch):
    """Saving over a recipe carries the labels first, then the results log; when the log
    cannot follow (here: the disk is full) the save stops, and the recipe left there keeps
    its own labels, not this session's (nothing set aside is left behind either)."""
    import errno

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    recipe_before = path.read_bytes()

    t, _, errors = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    _the_log_copy_fails(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    t.save_recipe(path)
    assert "Recipe NOT saved: the results log could not be copied" in errors[-1]
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]
    assert not list(path.parent.glob("*.replaced-*")) and path.read_bytes() == recipe_before
    assert t.recipe_path != path and len(t.labels.rows()) == 1  # t's own label is still in its store


def test_a_save_to_a_new_place_stopped_by_the_results_log_leaves_no_labels_there(
        session, part_images, tmp_path, monkeypatch):
    s = session
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    _the_log_copy_fails(monkeypatch, OSError("disk full"))
    path = tmp_path / "new" / "station.okng-recipe"
    s.save_recipe(path)
    assert "Recipe NOT saved" in s.errors[-1]
    assert not path.with_suffix(".labels.sqlite").exists() and not path.exists()


def test_a_model_that_cannot_be_saved_puts_the_stores_beside_the_old_recipe_back(
        session, part_images, tmp_path, tiny_config, monkeypatch):
    """The model is the largest file of a save and the likeliest to meet a full disk: when it
    cannot be written, the labels and results log already carried beside the old recipe go
    back, and the session keeps its own recipe path (nothing was saved)."""
    import core.session as session_module

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    recipe_before, model_before = path.read_bytes(), model_path_for(path).read_bytes()

    t, _, errors = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    own_path = t.recipe_path

    def full(det, model_path, token):
        raise OSError(28, "No space left on device")
        yield  # a job

    monkeypatch.setattr(session_module, "save_model_job", full)
    t.save_recipe(path)
    assert errors[-1].startswith("Could not save the model") and "NOT saved" in errors[-1]
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]
    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 1  # the old recipe's one
    assert path.read_bytes() == recipe_before and model_path_for(path).read_bytes() == model_before
    assert not list(path.parent.glob("*.replaced-*")) and not list(path.parent.glob("*.saving"))  # nothing to undo
    assert t.recipe_path == own_path and [r.id for r in t.labels.rows()]  # its labels where they were


def test_a_recipe_file_that_cannot_be_written_after_its_model_keeps_the_stores_with_that_model(
        session, part_images, tmp_path, tiny_config, monkeypatch):
    """The model is written, then the recipe file fails: the model beside it holds this
    session's labels, so the carried stores stay with it, and the error says how to finish."""
    import core.session as session_module
    from core.errors import OkngError

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    t, _, errors = _other_station_with_a_label(tmp_path, tiny_config, part_images)

    def unwritable(recipe, where):
        raise OkngError(f"Could not write {where}: permission denied")

    monkeypatch.setattr(session_module, "save_recipe", unwritable)
    t.save_recipe(path)
    assert errors[-1].endswith("save again to write the recipe file.")
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ben"]
    monkeypatch.undo()
    n_errors = len(errors)
    t.save_recipe(path)  # saving again completes it
    from core.recipes import load_recipe

    assert len(errors) == n_errors and t.recipe_path == path and load_recipe(path).name == "station"


def test_a_second_save_waits_for_the_first_one_to_end(session, part_images, tmp_path):
    """Until a save's model is written its stores can still be put back: a second save in
    that time is refused with a word, not run across it."""
    from tests.core.test_session import HoldingExecutor

    s = session
    said = []
    s.status.connect(said.append)
    s.executor, inline = HoldingExecutor(), s.executor
    first, second = tmp_path / "a.okrecipe", tmp_path / "b.okrecipe"
    s.save_recipe(first)
    s.save_recipe(second)
    assert said[-1] == "Still saving the recipe…" and len(s.executor.held) == 1
    s.executor.run_next()
    s.executor = inline
    assert first.exists() and not second.exists() and not s.saving
    s.save_recipe(second)
    assert second.exists()


def _untitled_fitted_station(tmp_path, part_images, tiny_config) -> InspectionSession:
    """A station with a new, never saved recipe ("untitled"), fitted; operator "ana"."""
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    s.new_recipe("untitled", tiny_config, part_images[0])
    s.operator = "ana"
    s.start_fit()
    return s


def test_an_untitled_recipes_labels_and_log_follow_it_to_its_first_file(tmp_path, part_images, tiny_config):
    """The everyday first save: a new recipe fitted, inspected and labelled, then saved. Its
    stores are carried beside the file (they used to be looked up under the file's name
    before the copy, and the saved recipe came without its labels)."""
    s = _untitled_fitted_station(tmp_path, part_images, tiny_config)
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    path = tmp_path / "line" / "cells.okrecipe"
    assert s.save_recipe(path)
    assert s.recipe.name == "cells" and s.recipe_path == path
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]
    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 1
    assert len(s.labels.rows()) == 1


def test_each_new_recipe_has_stores_of_its_own_and_the_demo_keeps_its_own(tmp_path, part_images, tiny_config):
    """Found trying the station: every New recipe is "untitled", and all of them shared one
    labels store and results log in the data folder, so a discarded product's false alarms
    were replayed into the next product's fit and its counters counted the other parts. The
    demo keeps one store under its name on purpose: its labels carry over between demo
    sessions."""
    from core.recipes import safe_file_stem
    from core.session import DEMO_RECIPE_NAME

    s = _untitled_fitted_station(tmp_path, part_images, tiny_config)
    s.inspect_paths(part_images[1][:2])
    s.labels.mark_image("image_ok")
    assert len(s.labels.rows()) == 1 and s.shift.counters().total == 2
    s.new_recipe("untitled", tiny_config, part_images[0])  # discarded: another product
    assert s.labels.rows() == [] and s.shift.counters() is None
    said = []
    s.status.connect(said.append)
    s.start_fit()
    assert not any("replayed" in line for line in said) and s.detector.applied_labels == ()
    demo_store = s.labels_dir / f"{safe_file_stem(DEMO_RECIPE_NAME)}.labels.sqlite"
    s.new_recipe(DEMO_RECIPE_NAME, tiny_config, part_images[0])
    assert s.labels.store_path == demo_store
    s.new_recipe("untitled")
    s.new_recipe(DEMO_RECIPE_NAME, tiny_config, part_images[0])
    assert s.labels.store_path == demo_store


def test_after_a_save_the_store_files_alone_hold_the_labels_and_the_log(session, part_images, tmp_path):
    """Found trying the station: after a save the labels were only in the ``-wal`` file, so a
    copy of the recipe folder taken while the station ran came without them."""
    import shutil

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    s.inspect_paths(part_images[1][1:2])
    s.labels.mark_image("image_ng")
    assert s.save_recipe(path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in (".labels.sqlite", ".results.sqlite"):  # the files only, no -wal
        shutil.copy(path.with_suffix(suffix), copy / f"station{suffix}")
    assert len(LabelStore(copy / "station.labels.sqlite").labels()) == 2
    assert len(ResultsLog(copy / "station.results.sqlite").entries()) == 2


def test_a_damaged_results_log_never_stops_saving_in_place_and_a_copy_elsewhere_names_it(
        session, part_images, tmp_path):
    """Found trying the station: a truncated results log refused every save, Ctrl+S to the
    same file too, so the model and thresholds could not be saved at all."""
    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    s.shift.close()
    log = path.with_suffix(".results.sqlite")
    for extra in ("-wal", "-shm"):
        Path(f"{log}{extra}").unlink(missing_ok=True)
    log.write_bytes(log.read_bytes()[:5000])
    s.set_thresholds(s.image_threshold * 1.1, s.pixel_threshold)
    n = len(s.errors)
    assert s.save_recipe(path) and not s.dirty and len(s.errors) == n
    s.save_recipe(tmp_path / "elsewhere" / "copy.okrecipe")
    assert s.errors[-1].startswith(f"Recipe NOT saved there: its results log ({log}) cannot be read")
    assert "Move that file aside" in s.errors[-1] and not (tmp_path / "elsewhere" / "copy.okrecipe").exists()


def _killed_during_save_over(s, t, path, steps):
    """Station ``t`` saves over ``path`` and its process dies after ``steps`` steps of the
    save's job (no callback runs, nothing is closed); a fresh station then opens ``path``:
    (that station, what it said as errors)."""
    from tests.core.test_session import HoldingExecutor

    t.executor = HoldingExecutor()
    t.save_recipe(path)
    job, _ = t.executor.held.pop()
    gen = job(CancelToken())
    try:
        for _ in range(steps):
            next(gen)
    except StopIteration:
        pass
    u = InspectionSession(InlineExecutor(), labels_dir=path.parent / "l3", captures_dir=path.parent / "c3")
    said = []
    u.error.connect(said.append)
    u.open_recipe(path)
    return u, said


def test_a_save_over_another_recipe_killed_before_its_model_is_put_back_when_that_recipe_opens(
        session, part_images, tmp_path, tiny_config):
    """Found trying the station: killed between copying the stores and writing the model, a
    save left the other recipe with this session's labels and results log, and opening it
    said nothing (its next fit would have replayed another product's labels)."""
    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    t, _, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    u, said = _killed_during_save_over(s, t, path, steps=3)  # both stores copied, the model not yet
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]
    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 1
    assert said[0].startswith("A save onto this recipe was interrupted (the station stopped) before its model")
    assert not list(path.parent.glob("*.saving")) and not list(path.parent.glob("*.replaced-*"))
    assert len(u.labels.rows()) == 1 and u.shift.counters().total == 1


def test_a_save_killed_after_its_model_keeps_the_stores_with_that_model_and_says_so(
        session, part_images, tmp_path, tiny_config):
    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    t, _, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    u, said = _killed_during_save_over(s, t, path, steps=10)  # the whole job; the recipe file not written
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ben"]
    assert said[0].startswith("A save onto this recipe stopped after its model was written")
    assert "the replaced labels: in" in said[0] and not list(path.parent.glob("*.saving"))


def test_a_save_killed_while_setting_the_old_store_aside_leaves_it_untouched(session, part_images, tmp_path):
    """Killed while the replaced store was being copied aside: only an unfinished ``.part``
    copy exists; the store itself was never touched and the ``.part`` goes."""
    from core.session_carry import StoreCopy, write_journal

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    target = path.with_suffix(".labels.sqlite")
    aside = f"{target}.replaced-20261203-120000"
    write_journal(path, [StoreCopy(tmp_path / "other.sqlite", target, "labels", aside)], None)
    Path(f"{aside}.part").write_bytes(b"half a database")
    s.open_recipe(path)
    assert s.errors[-1].startswith("A save onto this recipe was interrupted")
    assert not Path(f"{aside}.part").exists() and [r.operator for r in LabelStore(target).labels()] == ["ana"]


def test_a_save_journal_is_undone_once_and_never_while_its_save_may_still_run(tmp_path):
    """Recovery deletes stores a save created: run twice (after a put-back that failed) it
    would delete stores in use by then, and run beside a save still going on in another
    process (a second station, ``okng serve``) it would undo that save half-way."""
    import json
    import os
    import socket

    from core.session_carry import StoreCopy, journal_path, recover_interrupted_save, write_journal

    recipe = tmp_path / "line.okrecipe"
    target = tmp_path / "line.labels.sqlite"
    aside = f"{target}.replaced-20261203-120000"
    with LabelStore(target):
        pass
    Path(aside).write_bytes(b"not a database")  # its put-back fails
    write_journal(recipe, [StoreCopy(tmp_path / "src.sqlite", target, "labels", aside)], None)
    said = recover_interrupted_save(recipe)
    assert "could not be put back" in said and "line.okrecipe.saving.failed" in said
    assert not journal_path(recipe).exists() and target.exists()
    assert recover_interrupted_save(recipe) == ""  # once only
    write_journal(recipe, [StoreCopy(tmp_path / "src.sqlite", target, "labels", None)], None)
    data = json.loads(journal_path(recipe).read_text())
    data["owner"] = {"host": socket.gethostname(), "pid": os.getppid()}  # a live process
    journal_path(recipe).write_text(json.dumps(data))
    assert recover_interrupted_save(recipe) == "" and target.exists() and journal_path(recipe).exists()


def test_the_stores_are_copied_on_the_engine_thread_in_the_saves_own_job(
        session, part_images, tmp_path, tiny_config):
    """A results log grows with every inspection (a million rows took 2 s to copy): the copy
    is part of the save's job, so the window never waits for it; nothing is beside the
    target until that job runs, and everything is once it has."""
    from tests.core.test_session import HoldingExecutor

    t, said, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    path = tmp_path / "new" / "station.okrecipe"
    t.executor, inline = HoldingExecutor(), t.executor
    t.save_recipe(path)
    assert t.saving and len(t.executor.held) == 1
    assert not path.with_suffix(".labels.sqlite").exists() and not path.with_suffix(".results.sqlite").exists()
    t.executor.run_next()
    t.executor = inline
    assert said[-1] == f"Recipe saved to {path}" and t.recipe_path == path
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ben"]
    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 2
    assert Path(t.labels.store().path) == path.with_suffix(".labels.sqlite") and len(t.labels.rows()) == 1


def test_a_save_to_another_file_waits_for_the_running_job_and_one_in_place_does_not(
        session, part_images, tmp_path, tiny_config):
    """An inspection still running would log its last parts after the copy, into the old
    recipe's log only: a save that must copy the stores is refused until the engine is idle
    (the reason on screen, nothing written); saving the open recipe in place copies nothing
    and goes ahead."""
    from tests.core.test_session import HoldingExecutor

    class Busy(HoldingExecutor):
        busy = property(lambda self: bool(self.held))

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    s.executor, inline = Busy(), s.executor
    s.inspect_paths(part_images[1][:2])  # queued: the engine is busy with it
    elsewhere = tmp_path / "elsewhere" / "copy.okrecipe"
    s.save_recipe(elsewhere)
    assert s.errors[-1].startswith("Recipe NOT saved: saving it to another file waits until the running job ends")
    assert not s.saving and not elsewhere.parent.exists() and len(s.executor.held) == 1
    s.save_recipe(path)
    assert s.saving and len(s.executor.held) == 2
    while s.executor.held:
        s.executor.run_next()
    s.executor = inline
    assert not s.saving and s.recipe_path == path
    assert len(ResultsLog(path.with_suffix(".results.sqlite")).entries()) == 3


def test_while_a_save_runs_nothing_writes_the_stores_or_replaces_the_recipe_and_a_cancelled_one_puts_back(
        session, part_images, tmp_path, tiny_config):
    """Between carrying the stores and writing the model a label, a withdrawal, a new or
    opened recipe and live inspection wait (a put-back would erase what they wrote, or the
    save would land on another recipe); cancelled (Esc), the save puts the stores back and
    the session stays where it was."""
    from tests.core.test_session import HoldingExecutor

    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    t, said, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)
    own_path, own_recipe = t.recipe_path, t.recipe
    t.executor, inline = HoldingExecutor(), t.executor
    t.save_recipe(path)
    assert t.saving and len(t.executor.held) == 1
    t.show_result(list(t.results)[0].id)
    t.labels.mark_image("image_ok")
    t.labels.withdraw(t.labels.rows()[0].id)
    t.new_recipe("elsewhere")
    t.open_recipe(path)
    t.start_live("folder", str(tmp_path))
    assert said[-5:] == ["Still saving the recipe…"] * 5
    assert t.recipe is own_recipe and not t.live and len(t.executor.held) == 1
    assert len(t.labels.rows()) == 1 and not t.labels.rows()[0].undone
    t.executor.run_next(cancelled=True)
    t.executor = inline
    assert not t.saving and t.recipe_path == own_path
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]


def test_a_save_the_engine_cannot_take_puts_the_stores_back(session, part_images, tmp_path, tiny_config):
    s = session
    path = _recipe_saved_with_one_label(s, part_images, tmp_path)
    t, _, _ = _other_station_with_a_label(tmp_path, tiny_config, part_images)

    class Stopped(InlineExecutor):
        def submit(self, job, callbacks=None, replace=False):
            raise RuntimeError("the engine thread has stopped")

    t.executor = Stopped()
    with pytest.raises(RuntimeError):
        t.save_recipe(path)
    assert not t.saving
    assert [r.operator for r in LabelStore(path.with_suffix(".labels.sqlite")).labels()] == ["ana"]
