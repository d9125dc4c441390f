"""InspectionSession without Qt: the station's state and flows, driven inline.

These are the GUI's flows (fit, inspect, thresholds, click-to-label, undo, refit, recipes)
as plain Python: the window only adapts them.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import shutil

import pytest

from core.detector import DetectorConfig
from core.imageio import load_image
from core.jobs import InlineExecutor
from core.labels import LabelStore
from core.regions import find_regions
from core.session import InspectionSession
from core.session_results import judge
from tests.conftest import make_part


@pytest.fixture
def session(tmp_path, part_images, tiny_config):
    ok, _ = part_images
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    s.errors = []
    s.error.connect(s.errors.append)
    s.new_recipe("parts", tiny_config, ok)
    s.operator = "ana"
    s.start_fit()
    assert s.detector is not None and not s.errors
    return s


class HoldingExecutor(InlineExecutor):
    """Keeps each submitted job instead of running it (the engine thread still busy with
    it); :meth:`run_next` runs the oldest, optionally as if Esc cancelled it."""

    def __init__(self) -> None:
        self.held = []

    def submit(self, job, callbacks=None, replace=False):
        from core.jobs import CancelToken, JobCallbacks

        self.held.append((job, callbacks or JobCallbacks()))
        return CancelToken()

    def run_next(self, cancelled: bool = False) -> None:
        from core.jobs import CancelToken, deliver, drive

        job, cb = self.held.pop(0)
        token = CancelToken()
        if cancelled:
            token.cancel()
        drive(job, token, lambda kind, payload: deliver(cb, kind, payload))


def _inspect(s, paths):
    s.inspect_paths(list(paths))
    return list(s.results)[-len(paths):]


def test_thresholds_rejudge_stored_results_without_running_the_model(session, part_images, monkeypatch):
    s = session
    _, ng = part_images
    rec = _inspect(s, ng[:1])[0]
    assert rec.embedding is not None and rec.embedding.shape[0] == 1  # kept for feedback re-judging
    monkeypatch.setattr(s.detector, "embed", lambda *a: pytest.fail("model re-run"))
    changes = []
    s.results_changed.connect(lambda: changes.append(rec.verdict))
    s.set_thresholds(rec.score - 1e-3, s.pixel_threshold)
    s.set_thresholds(rec.score + 1e-3, s.pixel_threshold)
    assert changes == ["NG", "OK"] and s.thresholds_hand_set
    assert s.detector.thresholds.image == pytest.approx(rec.score + 1e-3)  # live jobs judge the same


def test_the_hottest_area_outlined_on_an_ng_with_no_pixel_above_the_pixel_threshold_can_be_labelled(
        session, part_images):
    """Found trying the station: with top-k pooling the calibrated pixel threshold lies above
    the image threshold, so a marginal NG shows the hottest area outlined, and clicking that
    outline said "No highlighted region here". What is outlined is what a click selects; a
    click outside it still selects nothing."""
    s = session
    _, ng = part_images
    rec = _inspect(s, ng[:1])[0]
    peak = float(rec.anomaly_map.max())
    s.set_thresholds(rec.score - 1e-3, peak * 1.5)  # NG by the image score, no pixel above
    s.show_result(rec.id)
    shown = s.display()
    assert rec.verdict == "NG" and len(shown.contours) == 1 and "click it to label it" in shown.note
    inside = np.zeros(rec.anomaly_map.shape, np.uint8)
    cv2.fillPoly(inside, [shown.contours[0]], 1)
    row, col = np.argwhere(inside & (rec.anomaly_map > 0.8 * peak))[0]
    coldest = np.unravel_index(int(np.argmin(rec.anomaly_map)), rec.anomaly_map.shape)
    assert not s.labels.select_at(int(coldest[0]), int(coldest[1]))
    assert s.labels.select_at(int(row), int(col))
    s.labels.mark_region("false_alarm")
    (label,) = s.labels.rows()
    assert label.kind == "false_alarm" and s.detector.applied_labels == (label.id,)


def test_false_alarm_click_travels_session_job_model_session(session, part_images):
    s = session
    _, ng = part_images
    rec = _inspect(s, ng[:1])[0]
    s.set_thresholds(s.image_threshold, float(np.percentile(rec.anomaly_map, 90)))
    region = find_regions(rec.anomaly_map, s.pixel_threshold)[0]
    row, col = np.argwhere(region.mask)[len(np.argwhere(region.mask)) // 2]
    saved = []
    s.labels.label_saved.connect(saved.append)
    assert s.labels.select_at(int(row), int(col))
    peak_before = float(rec.anomaly_map[region.mask].max())
    model_before = s.detector
    s.labels.mark_region("false_alarm")
    assert saved == [1] and s.detector is not model_before
    assert float(rec.anomaly_map[region.mask].max()) < peak_before  # re-judged under the new model
    with LabelStore(s.labels.store_path) as fresh:  # committed before acknowledged
        (lab,) = fresh.labels()
    assert lab.kind == "false_alarm" and np.array_equal(lab.region.mask, region.mask)
    assert s.detector.applied_labels == (1,)
    assert s.labels.rows()[0].in_model
    s.labels.undo_last()
    assert s.detector is not None and s.detector.applied_labels == ()
    assert not s.labels.rows()[0].in_model and s.labels.rows()[0].undone


def _twin_ng_results(s, ng_path):
    """The same defective part inspected twice: labelling one as OK must ask about the other."""
    first, twin = _inspect(s, [ng_path, ng_path])
    s.set_thresholds(first.score * (1 - 1e-4), s.pixel_threshold)
    assert first.verdict == twin.verdict == "NG"
    s.show_result(first.id)
    return first, twin


def test_a_label_that_would_pass_another_ng_part_asks_first_and_can_be_refused(session, part_images):
    s = session
    first, twin = _twin_ng_results(s, part_images[1][0])
    asked = []
    s.question.connect(asked.append)
    model_before, score_before = s.detector, twin.score
    s.labels.mark_image("image_ok")
    (q,) = asked
    assert twin.name in q.text and "judged NG would be judged OK" in q.text
    assert s.detector is model_before and twin.verdict == "NG"  # nothing applied while asking
    q.answer("Do not apply")
    assert s.detector is model_before and twin.score == score_before and twin.verdict == "NG"
    assert not s.labels.store_path.exists() or s.labels.rows() == []
    assert not s.labels.learner.can_undo  # the learner got its previous model back


def test_accepting_the_flip_applies_it_and_marks_the_changed_verdicts(session, part_images):
    s = session
    first, twin = _twin_ng_results(s, part_images[1][0])
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert twin.verdict == "OK" and twin.changed_from == "NG"
    assert len(s.labels.rows()) == 1


def test_the_changed_mark_shows_what_the_last_label_or_undo_changed_and_a_threshold_move_clears_it(
        session, part_images):
    """"NG → OK" says what the last model change did: an undo of the label marks what the
    undo changed back (OK → NG, never "NG → NG"), and moving the threshold, which is no
    label, clears every mark."""
    s = session
    first, twin = _twin_ng_results(s, part_images[1][0])
    # a margin the float16 embeddings the table re-scores from cannot cross
    s.set_thresholds(first.score * 0.99, s.pixel_threshold)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert (twin.changed_from, twin.verdict) == ("NG", "OK")
    s.labels.undo_last()
    assert (twin.changed_from, twin.verdict) == ("OK", "NG")  # the undo passed it back
    assert all(r.changed_from != r.verdict for r in s.results)
    s.labels.mark_image("image_ok")
    assert twin.changed_from == "NG"
    s.set_thresholds(s.image_threshold * 0.5, s.pixel_threshold)
    assert all(r.changed_from is None for r in s.results)


def test_a_refit_re_scores_the_results_table_under_the_new_model(session, part_images):
    """After a fit the table shows what the new model says of every result (score, map and
    verdict), as inspecting the images again would."""
    s = session
    s.inspect_paths(part_images[1][:2] + part_images[0][:2])
    before = {r.id: r.score for r in s.results}
    s.remove_ok_paths(s.ok_paths[: len(s.ok_paths) // 2])  # another OK set: another model
    s.start_fit()
    now = {r.id: r.score for r in s.results}
    assert now.keys() == before.keys() and now != before
    again = s.detector.inspect([load_image(p) for p in part_images[1][:2] + part_images[0][:2]])
    # the table keeps each result's embedding in float16: the same scores to that precision
    assert [r.score for r in s.results] == pytest.approx([i.score for i in again], rel=5e-3)
    assert [r.verdict for r in s.results] == [judge(i.score, s.image_threshold) for i in again]


def test_results_embedded_differently_leave_the_table_after_a_fit_with_other_channels(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:2])
    said = []
    s.status.connect(said.append)
    s.recipe.config = {**s.recipe.config, "n_channels": s.config.n_channels - 2}
    s.start_fit()
    assert len(s.results) == 0 and s.shown is None
    assert any("2 result(s) left the table" in line for line in said)


def test_without_anyone_to_ask_a_flip_is_never_applied(session, part_images):
    s = session
    first, twin = _twin_ng_results(s, part_images[1][0])
    s.labels.mark_image("image_ok")  # no listener: the safe default
    assert twin.verdict == "NG" and s.detector.applied_labels == ()


def test_refit_replays_active_labels_and_reports_the_ones_it_cannot(session, part_images, tmp_path):
    s = session
    _, ng = part_images
    moved = tmp_path / "moved.png"
    moved.write_bytes(open(ng[2], "rb").read())
    for path in (ng[0], str(moved), ng[1]):
        _inspect(s, [path])
        s.labels.mark_image("image_ok")
    s.labels.undo_last()  # the third label is undone: not replayed
    ids = [r.id for r in s.labels.rows()]
    assert s.detector.applied_labels == tuple(ids[:2])
    cv2.imwrite(str(moved), make_part(np.random.default_rng(9)))  # the image changed since its label
    errors = []
    s.error.connect(errors.append)
    s.start_fit()
    assert s.detector.applied_labels == (ids[0],)
    assert errors and f"label #{ids[1]}" in errors[-1] and "changed" in errors[-1]
    rows = {r.id: r for r in s.labels.rows()}
    assert rows[ids[0]].in_model and not rows[ids[1]].in_model and rows[ids[2]].undone


def test_hand_set_thresholds_survive_a_refit_or_the_engineer_chooses(session):
    s = session
    s.set_thresholds(s.image_threshold * 3, s.pixel_threshold * 2)
    mine = (s.image_threshold, s.pixel_threshold)
    s.start_fit()  # nobody to ask: the engineer's thresholds stay
    assert (s.image_threshold, s.pixel_threshold) == mine
    s.question.connect(lambda q: q.answer("Use the new calibration"))
    s.start_fit()
    th = s.detector.thresholds
    assert (s.image_threshold, s.pixel_threshold) == (th.image, th.pixel) != mine
    assert not s.thresholds_hand_set


def test_whether_thresholds_were_set_by_hand_is_saved_with_the_recipe(session, part_images, tmp_path):
    """Found trying the station: a label re-measures the held-out scores and leaves the
    thresholds, so after reopening they no longer "matched the calibration" and a refit asked
    about thresholds nobody had set. The recipe keeps what the engineer did."""
    s = session
    s.labels.set_reweight(True)
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ok")
    path = tmp_path / "parts.okrecipe"
    assert s.save_recipe(path) and not s.thresholds_hand_set
    s.open_recipe(path)
    assert not s.thresholds_hand_set
    asked = []
    s.question.connect(asked.append)
    s.start_fit()
    assert asked == []
    s.set_thresholds(s.image_threshold * 2, s.pixel_threshold)
    assert s.save_recipe(path)
    s.open_recipe(path)
    assert s.thresholds_hand_set


def test_a_reopened_recipe_says_which_labels_its_model_has_not_learnt(session, part_images, tmp_path):
    """Found trying the station: reopened after a crash or Discard, the recipe showed labels
    "(not in model)" and said nothing; the false alarm the operator had cleared was NG again."""
    s = session
    path = tmp_path / "parts.okrecipe"
    assert s.save_recipe(path)
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ok")  # after the save: the saved model has not learnt it
    said = []
    s.status.connect(said.append)
    s.open_recipe(path)
    assert said[-1].startswith("Recipe parts ready") and "1 label(s) are not in this model" in said[-1]
    s.start_fit()
    assert s.save_recipe(path)
    said.clear()
    s.open_recipe(path)
    assert "not in this model" not in said[-1]


def test_a_part_labelled_ok_whose_ok_set_change_was_not_saved_is_put_back_on_opening(session, part_images, tmp_path):
    """Found trying the station: Part is OK, then Discard (or a crash): the label stayed
    active but its part had left the OK set, silently; the next fit trained without it."""
    s = session
    path = tmp_path / "parts.okrecipe"
    assert s.save_recipe(path)
    rec = _inspect(s, part_images[1][:1])[0]
    s.labels.mark_image("image_ok")
    assert rec.path in s.ok_paths
    s.open_recipe(path)  # Discard: the saved OK set comes back without it
    assert rec.path in s.ok_paths and s.dirty
    assert s.errors[-1].startswith("1 part(s) labelled Part is OK were not in the saved OK set")
    assert s.save_recipe(path)
    n = len(s.errors)
    s.open_recipe(path)
    assert len(s.errors) == n and not s.dirty and s.ok_paths.count(rec.path) == 1
    s.remove_ok_paths([rec.path])  # taken out on purpose, and saved so: it stays out
    assert s.save_recipe(path)
    s.open_recipe(path)
    assert rec.path not in s.ok_paths and not s.dirty and len(s.errors) == n


def test_a_model_whose_labels_store_lost_its_labels_says_so_and_new_labels_take_new_numbers(
        session, part_images, tmp_path):
    """Found trying the station: the recipe folder copied while the station ran had an empty
    labels store; opened, nothing was said, and the next label became #1, listed as learnt
    by the model (which had learnt another #1)."""
    s = session
    _inspect(s, part_images[1][:2])
    s.labels.mark_image("image_ok")
    s.show_result(list(s.results)[0].id)
    s.labels.mark_image("image_ng")
    path = tmp_path / "parts.okrecipe"
    assert s.save_recipe(path)
    learnt = s.detector.applied_labels
    s.new_recipe("other")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path.with_suffix('.labels.sqlite')}{suffix}").unlink(missing_ok=True)
    s.open_recipe(path)
    assert s.detector.applied_labels == learnt and s.labels.rows() == []
    assert s.errors[-1].startswith("This model learnt 2 label(s) that the labels store beside the recipe does not hold")
    _inspect(s, part_images[1][2:3])
    s.labels.mark_image("image_ng")
    (row,) = s.labels.rows()
    assert row.id > max(learnt) and row.in_model


def test_recipe_round_trip_restores_model_labels_and_reweighting(session, part_images, tmp_path):
    s = session
    s.labels.set_reweight(True)
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ok")
    s.labels.mark_image("image_ng")  # a confirmed defect gives reweighting something to guard
    path = tmp_path / "parts.okrecipe"
    assert s.save_recipe(path) and path.with_suffix(".okng").is_file()
    again = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "other")
    states = []
    again.labels.reweight_changed.connect(states.append)
    again.open_recipe(path)
    assert again.detector.applied_labels == s.detector.applied_labels != ()
    assert states[-1] is (s.detector.model.channel_weights is not None)
    assert [r.in_model for r in again.labels.rows()] == [r.in_model for r in s.labels.rows()]
    # the labels list shows each label's score before -> after, as it did in the session
    assert [(r.score_before, r.score_after) for r in again.labels.rows()] == \
        [(r.score_before, r.score_after) for r in s.labels.rows()]
    assert all(r.score_after is not None for r in again.labels.rows())
    assert (again.image_threshold, again.pixel_threshold) == pytest.approx((s.image_threshold, s.pixel_threshold))


def test_a_refit_replays_labels_with_the_reweighting_they_were_made_with_and_shows_the_held_weights(
        session, part_images, tmp_path):
    """Labels made with *Learn channel weights* on are replayed with it after the box was
    unticked, so the refitted model learns the same weights; the box then shows what the
    model holds, and *What changed* describes the weights the model holds (not "unchanged"),
    after the refit and after reopening the recipe."""
    s = session
    s.labels.set_reweight(True)
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ok")
    s.labels.mark_image("image_ng")
    assert s.detector.model.channel_weights is not None  # the setup learns weights
    s.labels.set_reweight(False)
    boxes, changes = [], []
    s.labels.reweight_changed.connect(boxes.append)
    s.labels.weights_changed.connect(changes.append)
    s.start_fit()
    assert len(s.detector.applied_labels) == 2
    # learnt again (not bit for bit: the first learning guarded the NG results of that moment,
    # the replay those judged NG before the refit)
    assert s.detector.model.channel_weights is not None
    assert boxes[-1] is True and s.labels.reweight
    assert changes[-1] is not None and changes[-1].strength is None  # the weights the model holds
    path = tmp_path / "w.okrecipe"
    assert s.save_recipe(path)
    again = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "other")
    held = []
    again.labels.weights_changed.connect(held.append)
    again.open_recipe(path)
    assert held[-1] is not None and held[-1].lowest == changes[-1].lowest


def test_a_refit_guards_the_parts_judged_ng_before_it_against_replayed_channel_weights(
        session, part_images, monkeypatch):
    """The replay after a refit keeps NG what was judged NG until then, as a label made then
    would have: every NG result is protected, except a part a replayed label accepts."""
    from core.feedback import FeedbackLearner

    s = session
    _, ng = part_images
    s.labels.set_reweight(True)
    accepted = _inspect(s, ng[:1])[0]
    s.labels.mark_image("image_ok")
    others = _inspect(s, ng[1:])
    judged_ng = [r for r in s.results if r.verdict == "NG" and r.id != accepted.id]
    assert len(judged_ng) >= 2 and {r.id for r in others} <= {r.id for r in judged_ng}
    seen = []
    protect = FeedbackLearner.protect
    monkeypatch.setattr(FeedbackLearner, "protect", lambda self, e: seen.append(list(e)) or protect(self, e))
    s.start_fit()
    assert s.detector.applied_labels and seen
    assert len(seen[0]) == len(judged_ng)
    assert all(any(p is r.embedding for p in seen[0]) for r in judged_ng)
    assert not any(p is accepted.embedding for p in seen[0])


def test_lowrank_model_policy_is_the_same_for_cli_and_gui(session):
    from core.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["fit", "x.png", "--out", "m.okng", "--model", "padim-lowrank"])
    cli_cfg = _config_from_args(args)
    assert cli_cfg.n_channels is None  # every channel, projected: not plain PaDiM on 100 channels
    session.set_model("padim-lowrank")
    assert session.config.model == "padim-lowrank" and session.config.n_channels is None
    assert DetectorConfig.for_model("padim").n_channels == 100
    args = build_parser().parse_args(["fit", "x.png", "--out", "m.okng", "--model", "padim-lowrank",
                                      "--channels", "150"])
    assert _config_from_args(args).n_channels == 150  # the engineer's choice wins


def test_the_engine_imports_no_qt_and_no_gui():
    code = ("import sys, core, core.session, core.cli, core.session_labels, core.feedback_jobs; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'PySide6', 'pyqtgraph', 'superqt', 'gui'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_okng_offers_the_window_commands_without_loading_qt():
    """`okng gui` / `okng demo` come from the GUI package's entry point; the CLI stays Qt-free."""
    code = ("import sys, core.cli; p = core.cli.build_parser(); "
            "a = p.parse_args(['gui', 'r.okrecipe']); assert a.recipe == 'r.okrecipe', a; "
            "assert p.parse_args(['demo']).command == 'demo'; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'PySide6', 'pyqtgraph'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_inspection_is_logged_and_counted(session, part_images, tmp_path):
    s = session
    ok, ng = part_images
    counts = []
    s.shift.counters_changed.connect(counts.append)
    s.set_station_setting("copy_ng_images", True)
    recs = _inspect(s, [ok[0], ng[0]])
    c = counts[-1]
    assert (c.total, c.ok + c.ng) == (2, 2) and c.ng == sum(r.verdict == "NG" for r in recs)
    entries = s.shift.log().entries()
    assert [e.image_path for e in reversed(entries)] == [ok[0], ng[0]]
    assert all(e.operator == "ana" and len(e.image_sha256) == 64 and e.model_id.startswith("fit@") for e in entries)
    ng_rows = [e for e in entries if e.verdict == "NG"]
    assert all(e.ng_copy and cv2.imread(e.ng_copy) is not None for e in ng_rows)
    statuses = []
    s.status.connect(statuses.append)
    s.shift.reset_counters()
    assert s.shift.counters().total == 0 and len(s.shift.log().entries()) == 2
    # a new shift: the last shift's name is not carried into its labels
    assert s.operator == "" and "enter your name" in statuses[-1]


def test_operator_mode_locks_thresholds_fit_and_settings_but_not_labels(session, part_images):
    s = session
    errors = []
    s.error.connect(errors.append)
    s.lock()
    assert s.role == "engineer" and "PIN" in errors[-1]  # no PIN: nobody could unlock again
    assert s.set_pin("4711") and s.recipe.station["pin_hash"].startswith("pbkdf2-sha256$")
    assert "4711" not in s.recipe.station["pin_hash"]
    s.lock()
    assert s.role == "operator"
    before = (s.image_threshold, s.pixel_threshold, len(s.ok_paths), s.detector)
    s.set_thresholds(1.0, 1.0)
    s.start_fit()
    s.add_ok_paths(part_images[1])
    s.set_model("patchcore")
    assert (s.image_threshold, s.pixel_threshold, len(s.ok_paths), s.detector) == before
    assert sum("Operator mode" in e for e in errors) == 4
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ng")  # operators still label
    assert len(s.labels.rows()) == 1
    assert not s.unlock("0000") and s.role == "operator"
    assert s.unlock("4711") and s.role == "engineer"


def test_unsaved_changes_are_tracked_until_saved(session, tmp_path):
    s = session
    assert s.dirty  # a fitted model nobody saved yet
    path = tmp_path / "parts.okrecipe"
    s.save_recipe(path)
    assert not s.dirty
    s.set_thresholds(s.image_threshold * 1.1, s.pixel_threshold)
    assert s.dirty
    s.save_recipe()
    s.open_recipe(path)
    assert not s.dirty and s.role == "engineer"


def test_a_label_the_database_refuses_is_not_applied(session, part_images, monkeypatch):
    """What sqlite3 really raises when the store is locked or the disk is full."""
    import sqlite3

    s = session
    _inspect(s, part_images[1][:1])
    store = s.labels.store()
    model_before = s.detector

    def locked(label):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "add", locked)
    errors = []
    s.error.connect(errors.append)
    s.labels.mark_image("image_ok")
    assert errors and "NOT saved" in errors[-1] and "database is locked" in errors[-1]
    assert s.detector is model_before and s.detector.applied_labels == ()
    assert not s.labels.can_undo and not s.labels.learner.can_undo  # the learner is back too


def test_the_log_exports_all_ng_only_or_this_shift(session, part_images, tmp_path):
    s = session
    ok, ng = part_images
    _inspect(s, [ok[0], ng[0]])
    s.shift.reset_counters()
    _inspect(s, [ng[1]])
    every, shift = tmp_path / "all.csv", tmp_path / "shift.csv"
    s.shift.export(str(every))
    s.shift.export(str(shift), shift_only=True)
    assert len(every.read_text().splitlines()) == 1 + 3
    rows = shift.read_text().splitlines()
    assert len(rows) == 1 + 1 and ng[1] in rows[1]
    s.shift.export(str(tmp_path / "ng.csv"), ng_only=True)
    assert all(",NG," in r for r in (tmp_path / "ng.csv").read_text().splitlines()[1:])


def test_a_flip_question_names_every_part_it_would_pass(session, part_images):
    s = session
    ng = part_images[1][0]
    recs = _inspect(s, [ng] * 3)
    s.set_thresholds(recs[0].score * (1 - 1e-4), s.pixel_threshold)
    s.show_result(recs[0].id)
    asked = []
    s.question.connect(asked.append)
    s.labels.mark_image("image_ok")
    (q,) = asked
    name = recs[0].name
    assert q.title == "Label would pass NG parts" and q.options == ("Apply the label", "Do not apply")
    assert q.default == "Do not apply"
    assert f"2 part(s) judged NG would be judged OK: {name}, {name}." in q.text


def test_a_false_alarm_that_leaves_the_part_ng_says_where_the_score_now_comes_from(session, part_images):
    """Found trying the station: after "False alarm" the part stayed NG for a small spot elsewhere
    and the status line only said the label was saved."""
    s = session
    rec = _inspect(s, part_images[1][:1])[0]
    assert rec.verdict == "NG"
    s.set_thresholds(s.image_threshold, float(np.percentile(rec.anomaly_map, 90)))
    hottest = np.unravel_index(int(np.argmax(rec.anomaly_map)), rec.anomaly_map.shape)
    regions = find_regions(rec.anomaly_map, s.pixel_threshold)
    other = next(r for r in regions if not r.mask[hottest])  # a region away from the hottest spot
    row, col = np.argwhere(other.mask)[len(np.argwhere(other.mask)) // 2]
    assert s.labels.select_at(int(row), int(col))
    said = []
    s.status.connect(said.append)
    s.labels.mark_region("false_alarm")
    assert s.results.get(rec.id).verdict == "NG"
    assert "The part stays NG: score " in said[-1]
    h, w = rec.anomaly_map.shape
    ih, iw = rec.image.shape[:2]
    y, x = np.unravel_index(int(np.argmax(rec.anomaly_map)), (h, w))
    near = f"near x {int((x + 0.5) / w * iw)}, y {int((y + 0.5) / h * ih)})"  # the image's pixels, not the map's
    assert "now from another spot (" in said[-1] and " of the image, " + near in said[-1]


@pytest.mark.parametrize("row, col, area", [(0, 0, "top left"), (111, 112, "centre"), (223, 223, "bottom right"),
                                             (100, 5, "middle left"), (10, 120, "top centre")])
def test_a_spot_is_named_by_where_it_is_in_the_image_and_its_pixel_there(row, col, area):
    from core.session_labels import _where_in_image

    assert _where_in_image(row, col, (224, 224), None) == f"{area} of the image"
    image = np.zeros((300, 600, 3), np.uint8)  # the map is stretched over the whole image
    x, y = int((col + 0.5) / 224 * 600), int((row + 0.5) / 224 * 300)
    assert _where_in_image(row, col, (224, 224), image) == f"{area} of the image, near x {x}, y {y}"


def test_a_refit_with_stored_labels_keeps_the_fits_line_in_the_replays(session, part_images):
    """Found trying the station: "2 stored label(s) replayed into the new model" replaced the
    fit's line half a second later, and with it why the threshold moved."""
    s = session
    rec = _inspect(s, part_images[1][:1])[0]
    s.set_thresholds(s.image_threshold, float(np.percentile(rec.anomaly_map, 90)))
    region = find_regions(rec.anomaly_map, s.pixel_threshold)[0]
    row, col = np.argwhere(region.mask)[len(np.argwhere(region.mask)) // 2]
    assert s.labels.select_at(int(row), int(col))
    s.labels.mark_region("false_alarm")
    said = []
    s.status.connect(said.append)
    s.start_fit()
    fit_line = next(m for m in said if m.startswith("Model fitted on "))
    replay = next(m for m in said if "stored label(s) replayed into the new model" in m)
    assert replay.startswith(fit_line) and replay.endswith(". 1 stored label(s) replayed into the new model")
    assert s.fit_line == ""  # said once


def test_the_status_line_says_what_the_station_is_doing(session, tmp_path):
    s = session
    said = []
    s.status.connect(said.append)
    s.start_fit()
    assert said[0] == f"Fitting on {len(s.ok_paths)} OK images…"
    assert said[1].startswith("Model fitted on ")
    s.save_recipe(tmp_path / "r.okng-recipe")
    assert said[-1] == f"Recipe saved to {tmp_path / 'r.okng-recipe'}"
    said.clear()
    s.open_recipe(tmp_path / "r.okng-recipe")
    assert f"Loading model {Path(s.recipe.model_path).name}…" in said
    assert said[-1].startswith("Recipe r ready; inspection runs on ")


def test_a_fit_that_fails_is_reported_and_leaves_the_model(session, tmp_path):
    s = session
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    s.recipe.ok_paths = [str(bad)]
    before = s.detector
    s.errors.clear()
    s.start_fit()
    assert s.detector is before and len(s.errors) == 1 and s.errors[0].startswith("Fit failed")


def test_operator_mode_refusals_say_what_needs_an_engineer(session, part_images):
    s = session
    assert s.set_pin("4711")
    s.lock()
    s.errors.clear()
    s.set_thresholds(1.0, 1.0)
    s.add_ok_paths(part_images[1])
    s.set_model("patchcore")
    s.start_fit()
    wanted = ["move the thresholds", "change the OK set", "change the model", "fit a model"]
    assert [w in e for w, e in zip(wanted, s.errors)] == [True] * 4 and len(s.errors) == 4


def test_operators_cannot_switch_channel_weight_learning_or_reset_the_weights(session, part_images):
    """Channel weights change how every later part is scored: an engineer's setting (found
    trying the station: both stayed available in operator mode)."""
    s = session
    shown = []
    s.labels.reweight_changed.connect(shown.append)
    assert s.set_pin("4711")
    s.lock()
    s.errors.clear()
    s.labels.set_reweight(True)
    assert s.labels.reweight is False and shown[-1] is False  # refused; the box shows what holds
    _inspect(s, part_images[1][:1])
    detector = s.detector
    s.labels.reset_weights()
    assert s.detector is detector  # nothing was submitted
    assert ["change channel weight learning" in s.errors[0], "reset the channel weights" in s.errors[1]] == [True] * 2
    assert s.unlock("4711")
    s.labels.set_reweight(True)
    assert s.labels.reweight is True


def test_resetting_the_channel_weights_is_an_unsaved_change(session, part_images, tmp_path):
    """Found trying the station: the reset changed the model but quitting did not ask, and the
    saved weights came back on reopening."""
    s = session
    _inspect(s, part_images[1][:1])
    assert s.save_recipe(tmp_path / "r.okrecipe") and not s.dirty
    said = []
    s.status.connect(said.append)
    s.labels.reset_weights()
    assert s.dirty and said[-1].startswith("Channel weights reset")


def test_the_model_choice_can_go_back_to_padim(session):
    s = session
    s.set_model("patchcore")
    assert s.config.model == "patchcore"
    s.set_model("padim")
    assert s.config.model == "padim"


def test_a_session_fits_and_inspects_on_the_runtime_it_was_given(tmp_path, part_images, tiny_config):
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "l", captures_dir=tmp_path / "c", runtime="torch")
    s.new_recipe("parts", tiny_config, part_images[0])
    s.start_fit()
    assert s.detector.runtime_name == "torch"


def test_a_label_keeps_the_thresholds_the_engineer_set(session, part_images):
    s = session
    rec = _inspect(s, part_images[0][:1])[0]
    s.set_thresholds(rec.score + 5.0, s.pixel_threshold * 1.5)
    image, pixel = s.image_threshold, s.pixel_threshold
    told = []
    s.thresholds_changed.connect(lambda i, p: told.append((i, p)))
    s.show_result(rec.id)
    s.labels.mark_image("image_ok")
    assert len(s.labels.rows()) == 1 and s.detector.applied_labels
    assert (s.image_threshold, s.pixel_threshold) == (image, pixel)
    assert told and told[-1] == (image, pixel)


def test_thresholds_set_by_hand_reach_the_detector_both_of_them(session):
    s = session
    s.set_thresholds(s.image_threshold * 1.25, s.pixel_threshold * 0.75)
    assert (s.detector.thresholds.image, s.detector.thresholds.pixel) == (s.image_threshold, s.pixel_threshold)


def test_the_labels_list_shows_each_label_with_its_time_kind_and_image(session, part_images):
    s = session
    _inspect(s, part_images[1][:1])
    s.labels.mark_image("image_ng")
    (row,) = s.labels.rows()
    with LabelStore(s.labels.store_path) as store:
        (lab,) = store.labels()
    assert (row.id, row.created_at, row.kind, row.image_name) == (lab.id, lab.created_at, "image_ng",
                                                                  Path(part_images[1][0]).name)
    assert row.created_at > 0 and row.in_model and not row.undone


def test_the_training_budget_is_set_for_models_that_train_by_an_engineer_and_kept_in_the_recipe(session):
    s = session
    assert s.training_budget() is None  # padim trains no network
    s.set_training_budget(120.0)
    assert "budget" not in s.config.model_params
    s.set_model("kdad")
    assert s.training_budget() == 600.0  # the model's default: ten minutes
    s.set_training_budget(180.0)
    assert s.training_budget() == 180.0 and s.config.model_params["budget"] == 180.0
    assert s.recipe.config["model_params"]["budget"] == 180.0 and s.dirty
    assert s.set_pin("4711")
    s.lock()
    s.set_training_budget(60.0)
    assert s.training_budget() == 180.0 and "engineer" in s.errors[-1]


def test_no_label_starts_while_the_results_are_re_scored_and_a_cancelled_re_scoring_empties_the_table(
        session, part_images):
    """The re-scoring after a fit runs as a job: until it is done a label would guard, and
    undo to, the previous model's verdicts, so none starts; cancelled, the results it did
    not score leave the table rather than stay judged by the previous model."""
    s = session
    s.inspect_paths(part_images[1][:2])
    s.executor, inline = HoldingExecutor(), s.executor
    said = []
    s.status.connect(said.append)
    s.rescore_results()
    assert s.rescoring and len(s.executor.held) == 1
    s.show_result(list(s.results)[0].id)
    s.labels.mark_image("image_ng")
    assert said[-1] == "Still re-judging the results under the new model…" and s.labels.rows() == []
    s.executor.run_next(cancelled=True)  # Esc while it ran
    assert not s.rescoring and len(s.results) == 0
    assert "2 result(s) left the table: their re-scoring was cancelled" in said[-1]
    s.executor = inline


def test_labels_after_reopening_reweight_as_they_would_have_in_the_session_that_made_the_earlier_ones(
        session, part_images, tmp_path):
    """What reweighting learnt from earlier labels (false-alarm and defect channel shares,
    the confirmed defects it must keep catching) is saved with the model: after reopening,
    the next label gives the same channel weights as in the session that never closed."""
    s = session
    said = []
    s.status.connect(said.append)
    s.question.connect(lambda q: (said.append(q.text), q.answer("Apply the label")))
    s.labels.set_reweight(True)
    parts = part_images[1][:2] + part_images[0][:2]
    _inspect(s, parts)
    s.show_result(list(s.results)[0].id)
    s.labels.mark_image("image_ok")
    s.labels.mark_image("image_ng")
    assert s.detector.model.channel_weights is not None, (s.errors, said)
    path = tmp_path / "w.okrecipe"
    assert s.save_recipe(path)
    again = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "other")
    again_said = []
    again.error.connect(again_said.append)
    again.status.connect(again_said.append)
    again.open_recipe(path)
    assert again.labels.reweight, (again_said, s.errors, said)  # the reopened model holds the weights
    again.operator = "ben"
    again.question.connect(lambda q: (again_said.append(q.text), q.answer("Apply the label")))
    s.clear_results()
    for station in (s, again):
        _inspect(station, parts)
        station.show_result(list(station.results)[1].id)
        station.labels.mark_image("image_ok")
    w_session, w_reopened = s.detector.model.channel_weights, again.detector.model.channel_weights
    assert w_session is not None and w_reopened is not None, (again_said, s.errors, said)
    assert np.allclose(w_session.numpy(), w_reopened.numpy(), atol=1e-5)


def test_labels_wait_for_the_newest_re_scoring_not_only_the_first(session, part_images):
    s = session
    s.inspect_paths(part_images[1][:2])
    s.executor = HoldingExecutor()
    s.rescore_results()
    s.rescore_results()  # e.g. a second fit queued behind the first's re-scoring
    for i in range(2):
        s.executor.run_next()
        assert s.rescoring is (i == 0)  # the first one done, the newer one still to come
    assert len(s.results) == 2


def test_the_stations_fit_and_open_load_the_feedback_search_before_the_first_click(session, tmp_path, monkeypatch):
    """numba's load (0.5 s from its cache, 4 s on a fresh install) belongs in the fit or the
    opening of a recipe, where the engineer waits anyway, not in the operator's first click."""
    import core.feedback_memory as fm
    from tests.core.test_feedback_memory import unload_memory_kernels

    s = session
    unload_memory_kernels(monkeypatch)
    s.start_fit()
    assert fm._search_kernel is not None
    path = tmp_path / "k.okrecipe"
    assert s.save_recipe(path)
    unload_memory_kernels(monkeypatch)
    again = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "other")
    again.open_recipe(path)
    assert again.detector is not None and fm._search_kernel is not None


def test_results_an_inspection_adds_while_a_label_learns_are_judged_under_the_labelled_model(
        session, part_images):
    """The engine runs one job at a time: an inspection started before a label, and results
    it adds after the label took its list of results to re-judge, carry the old model's
    scores. They are scored again under the model the label left, as if inspected now."""
    import torch

    s = session
    ok, ng = part_images
    _inspect(s, ng[:1])
    s.executor = held = HoldingExecutor()
    s.inspect_paths([ng[0], ok[0]])  # queued: the engine is busy with it
    s.labels.mark_image("image_ok")  # on the shown part; queued behind the inspection
    held.run_next()  # the inspection: its results arrive, scored by the old model
    held.run_next()  # the label: it re-judges the results it knew of (the first one only)
    while held.held:  # anything the session queued to catch up
        held.run_next()
    det = s.detector
    for rec in s.results:
        expected = det.maps_and_scores(rec.embedding.to(torch.float32))[1][0]
        assert rec.score == pytest.approx(float(expected), rel=1e-5), rec.name


def test_results_of_an_inspection_queued_before_a_label_are_scored_again_under_the_new_model(
        session, part_images):
    s = session
    ok, ng = part_images
    _inspect(s, ng[:1])
    s.executor = held = HoldingExecutor()
    s.labels.mark_image("image_ok")  # the label first ...
    s.inspect_paths([ng[0]])  # ... then an inspection whose job holds the model of before the label
    held.run_next()  # the label
    held.run_next()  # the inspection: old model
    while held.held:
        held.run_next()
    first, again = list(s.results)
    assert again.score == pytest.approx(first.score, rel=1e-5)  # the same part, the same model now


def test_a_refit_marks_and_names_the_verdicts_the_new_model_changed(session, part_images):
    s = session
    ok, ng = part_images
    parts = _inspect(s, ng[:2])
    s.set_thresholds(min(r.score for r in parts) * (1 - 1e-4), s.pixel_threshold)
    assert [r.verdict for r in parts] == ["NG", "NG"]
    s.add_ok_paths(ng[:2])  # the engineer decides these are good after all
    said = []
    s.status.connect(said.append)
    s.start_fit()  # thresholds kept (the question's default)
    flipped = [r for r in s.results if r.verdict == "OK"]
    assert flipped, "the refit on these parts should pass them"
    assert all(r.changed_from == "NG" for r in flipped)
    assert said[-1].startswith(f"The new model changed {len(flipped)} verdict(s): ")
    assert all(f"{r.name} NG → OK" in said[-1] for r in flipped)


def test_catching_up_on_late_results_keeps_the_labels_marks_and_an_undo_restores_exactly(session, part_images):
    """With the engine busy: the marks a label set stay while the results an inspection added
    meanwhile are scored again; and an undo gives the labelled part back the very values it
    had, queuing no re-scoring of it."""
    s = session
    ok, ng = part_images
    first, copy = _inspect(s, [ng[0], ng[0]])
    s.set_thresholds(min(first.score, copy.score) * (1 - 1e-4), s.pixel_threshold)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.show_result(first.id)
    orig = (first.score, first.anomaly_map.copy())
    s.executor = held = HoldingExecutor()
    s.inspect_paths([ok[0]])  # queued first
    s.labels.mark_image("image_ok")  # then the label
    held.run_next()  # inspection: its result carries the old model's score
    held.run_next()  # label: the copy of the accepted part passes, marked
    assert copy.changed_from == "NG" and len(held.held) == 1  # the late result's re-scoring
    held.run_next()
    assert copy.changed_from == "NG" and copy.verdict == "OK"  # still marked
    s.labels.undo_last()
    held.run_next()
    assert not held.held  # no re-scoring queued behind the undo
    assert first.score == orig[0] and np.array_equal(first.anomaly_map, orig[1])  # bit for bit


def test_a_part_labelled_ok_is_trained_on_at_the_next_fit_never_held_out(session, part_images, monkeypatch):
    """Held out, a part picked *because* it scored high would set the threshold by itself
    (found trying the station: 66.9 -> 83.0, three defects passed)."""
    import core.jobs as jobs

    s = session
    ng = part_images[1]
    rec = _inspect(s, ng[:1])[0]
    s.show_result(rec.id)
    s.question.connect(lambda q: q.answer("Apply the label"))
    s.labels.mark_image("image_ok")
    assert ng[0] in s.recipe.ok_paths  # the engineer's label adds the part to the OK set
    splits = []
    real = jobs.split_calibration
    monkeypatch.setattr(jobs, "split_calibration", lambda *a: splits.append(real(*a)) or splits[-1])
    s.start_fit()
    (fit, cal), = splits
    assert ng[0] in fit and ng[0] not in cal
    assert cal == real([p for p in s.recipe.ok_paths if p != ng[0]], s.config.calibration_fraction)[1]


def test_a_refit_after_one_more_ok_image_holds_out_the_same_parts(session, part_images, tmp_path):
    """What the replaced model held out is held out again, so the thresholds do not jump
    because the held-out share was re-dealt (core.jobs.split_calibration, held_before)."""
    s = session
    held = s.detector.calibration_paths
    assert len(held) == 2  # 20 % of 12
    extra = tmp_path / "ok_extra.png"
    cv2.imwrite(str(extra), make_part(np.random.default_rng(7)))
    s.add_ok_paths([str(extra)])
    statuses = []
    s.status.connect(statuses.append)
    s.start_fit()
    now = s.detector.calibration_paths
    assert len(now) == 3 and set(held) < set(now) and s.errors == []  # 20 % of 13: one more dealt
    assert any("calibrated on 3 (2 held out as before)" in m for m in statuses)


def test_a_refit_that_moves_the_threshold_says_which_held_out_part_it_rests_on():
    from core.session import threshold_move_text
    from core.thresholds import calibrate

    scores = np.array([20.0, 30.0, 95.4, 25.0])
    th = calibrate(scores, scores, 0.01)
    text = threshold_move_text(66.9, th, ["a.png", "b.png", "odd.png", "c.png"])
    assert text.startswith(f". Image threshold 66.90 → {th.image:.2f}: "
                           "it rests on the held-out OK part odd.png (95.40)")
    assert "with 4 held-out parts one part sets it at a 1% target: add OK images to steady it" in text
    assert threshold_move_text(th.image * 0.95, th, ["a.png", "b.png", "odd.png", "c.png"]) == ""  # 5 %: no news


def test_operator_mode_cannot_be_left_by_a_new_recipe_nor_a_protected_recipe_overwritten(session, tmp_path):
    """Found trying the station: in operator mode New recipe gave engineer mode without the
    PIN, and "Save as" then wrote a recipe without a PIN over the protected one."""
    s = session
    errors = s.errors
    protected = tmp_path / "line1.okrecipe"
    assert s.set_pin("4711") and s.save_recipe(protected)
    s.lock()
    errors.clear()
    s.new_recipe("untitled")
    s.open_demo()
    assert s.role == "operator" and s.recipe_path == protected  # both refused, said why
    assert len(errors) == 2 and all("Operator mode: an engineer must unlock" in e for e in errors)
    assert s.save_recipe(tmp_path / "copy.okrecipe") and not (tmp_path / "copy.okrecipe").exists()
    assert "save the recipe under another name" in errors[-1]
    # an engineer's recipe without that PIN cannot be saved over the protected file either
    assert s.unlock("4711")
    s.new_recipe("untitled", s.config, list(s.ok_paths))
    before = protected.read_bytes()
    errors.clear()
    assert s.save_recipe(protected)
    assert protected.read_bytes() == before and "protected by an engineer PIN: nothing was saved" in errors[0]
    # saved under another name it is fine, and the protected recipe itself still saves in place
    assert s.save_recipe(tmp_path / "other.okrecipe") and (tmp_path / "other.okrecipe").is_file()
    assert s.recipe.name == "other"  # an untitled recipe takes its file's name (title, recent menu)
    s.open_recipe(protected)
    assert s.unlock("4711") and s.save_recipe(protected) and len(errors) == 1


def test_a_saved_demo_recipe_opens_with_its_demo_stream_and_truth_tags(session, elpv_split, tmp_path):
    """Found trying the station: the demo saved as a recipe came back without the demo stream
    button and without the [OK]/[NG] truth in the result names."""
    s = session
    s.open_demo()
    stream, truth = list(s.demo_stream), dict(s.demo_truth)
    assert stream and set(truth.values()) == {"OK", "NG"}
    path = tmp_path / "demo.okrecipe"
    assert s.save_recipe(path)
    s.new_recipe("other")
    assert s.demo_stream == [] and s.demo_truth == {}
    s.open_recipe(path)
    assert s.demo_stream == stream and s.demo_truth == truth and s.errors == []
    # a recipe that names a split the station cannot make opens all the same, and says so
    from core.recipes import load_recipe, save_recipe

    statuses = []
    s.status.connect(statuses.append)
    for damaged in ({"kind": "mono", "seed": "x"}, {"kind": "mono", "seed": True}, {"kind": "mono", "seed": 1e400},
                    {"kind": "mono", "seed": -1}, {"kind": "tri", "seed": 0}, ["mono", 0]):
        odd = load_recipe(path)
        odd.station["demo_split"] = damaged
        save_recipe(odd, tmp_path / "odd.okrecipe")
        s.open_recipe(tmp_path / "odd.okrecipe")
        assert s.demo_stream == [] and s.recipe_path == tmp_path / "odd.okrecipe" and s.errors == []
        assert statuses[-1].endswith("no demo stream (the recipe's demo split is damaged)")
    # more OK cells added to the demo: still the demo, stream and all
    more = load_recipe(path)
    more.ok_paths = more.ok_paths + elpv_split.eval_ok[:1]
    save_recipe(more, tmp_path / "more.okrecipe")
    s.open_recipe(tmp_path / "more.okrecipe")
    assert s.demo_stream == stream
    # made into another product's recipe (none of the demo's cells left), it is no demo any more
    other = load_recipe(path)
    other.ok_paths = elpv_split.eval_ok[:3]
    save_recipe(other, tmp_path / "product.okrecipe")
    s.open_recipe(tmp_path / "product.okrecipe")
    assert s.demo_stream == [] and s.errors == [] and "no demo stream" not in statuses[-1]
    # and in the session: the demo's cells removed, the stream goes (and is not saved with it)
    s.open_recipe(path)
    assert s.demo_stream == stream
    changed = []
    s.recipe_changed.connect(changed.append)
    s.add_ok_paths(elpv_split.eval_ok[:2])
    s.remove_ok_paths(stream[:0] + [p for p in s.ok_paths if p not in elpv_split.eval_ok[:2]][:10])
    assert s.demo_stream == stream and changed == []  # demo cells left: still the demo
    s.remove_ok_paths([p for p in s.ok_paths if p not in elpv_split.eval_ok[:2]])
    assert s.demo_stream == [] and s.demo_truth == {} and "demo_split" not in s.recipe.station and changed


def test_a_recipe_whose_model_file_is_gone_says_so_and_a_save_keeps_its_thresholds(session, tmp_path):
    """Found trying the station: it opened as "no fitted model yet — press Fit", and Ctrl+S
    then wrote the recipe without the engineer's thresholds."""
    from core.recipes import load_recipe

    s = session
    path = tmp_path / "line1.okrecipe"
    s.set_thresholds(225.69, 304.45)
    assert s.save_recipe(path)
    model = Path(load_recipe(path).model_path)
    model.rename(tmp_path / "moved.okng")
    s.errors.clear()
    s.open_recipe(path)
    assert s.detector is None and len(s.errors) == 1
    assert f"its model file {model} is missing" in s.errors[0] and "225.7 / 304.4" in s.errors[0]
    assert s.save_recipe(path)
    again = load_recipe(path)
    assert (again.image_threshold, again.pixel_threshold) == (225.69, 304.45) and again.model_path == str(model)


def test_the_verdicts_changed_line_after_a_refit_says_again_why_the_threshold_moved(session, part_images):
    """The re-scoring's "The new model changed N verdict(s)" line replaces the fit's own line in
    the status bar: it carries the threshold note on, once."""
    s = session
    rec = _inspect(s, part_images[1][:1])[0]
    statuses = []
    s.status.connect(statuses.append)
    s._refit_note = "Image threshold 66.90 → 95.46: it rests on the held-out OK part odd.png (95.40)"
    flipped = "OK" if rec.verdict == "NG" else "NG"
    s._rejudge_after_model({rec.id: flipped})
    assert statuses[-1].endswith("(marked in the results). Image threshold 66.90 → 95.46: it rests on the "
                                 "held-out OK part odd.png (95.40)")
    s._rejudge_after_model({rec.id: flipped})
    assert "Image threshold" not in statuses[-1]  # said once


def test_reviewing_the_shift_shows_its_ng_parts_again_without_counting_them_again(session, part_images, tmp_path):
    """Found on a night shift: the window showed nothing of the night's parts, and inspecting
    their files again logged each as a new part (counters 42 → 51, yield 78.6 % → 64.7 %)."""
    s = session
    ok, ng = part_images
    first = _inspect(s, [ok[0], ng[0], ng[1]])
    expected = [r.path for r in first if r.verdict == "NG"]
    assert expected  # the fixture's defective parts are judged NG
    moved = tmp_path / "kept-only-as-copy.png"  # a part whose image was moved away after the shift
    shutil.copy(ng[1], moved)
    s.inspect_paths([str(moved)])
    moved.unlink()
    before, rows = s.shift.counters(), len(s.shift.log().entries(limit=None))
    said = []
    s.status.connect(said.append)
    s.results.clear()
    s.shift.review()
    assert [r.path for r in s.results] == expected  # oldest first, each image once
    after = s.shift.counters()
    assert (after.total, after.ng) == (before.total, before.ng) and len(s.shift.log().entries(limit=None)) == rows
    assert "(not logged or counted again); 1 part(s) without an image on disk" in said[0]
    assert said[-1].endswith("(a review: not logged)")
