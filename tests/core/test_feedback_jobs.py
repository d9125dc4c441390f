"""Feedback as engine jobs: what each job reports, returns and changes."""
import csv
import io

import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, run_job
from core.feedback import FeedbackLearner
from core.feedback_jobs import label_job, replay_labels_job, undo_job
from core.imageio import load_image
from core.labels import Label, RegionShape, file_sha256


@pytest.fixture
def fitted(tiny_config, part_images):
    ok, ng = part_images
    return run_job(fit_job(ok, tiny_config, CancelToken())).detector, ok, ng


def _progress(gen):
    seen = []
    result = run_job(gen, on_progress=lambda p: seen.append((p.done, p.total, p.message)))
    return seen, result


def _kept(det, paths):
    """(result id, embedding) pairs as a session keeps them for re-judging."""
    return [(i + 1, det.embed([load_image(p)])) for i, p in enumerate(paths)]


def test_a_label_job_reports_learning_then_rejudging_and_returns_the_rejudged_results(fitted):
    det, ok, ng = fitted
    img = load_image(ng[0])
    learner = FeedbackLearner(det, reweight=False)
    kept = _kept(det, ng[1:3])
    seen, out = _progress(label_job(learner, "image_ok", img, ng[0], None, kept, CancelToken()))
    assert seen == [(0, 2, "learning: part OK"), (1, 2, "re-judging 2 results")]
    assert out.kind == "image_ok" and out.sha256 == file_sha256(ng[0]) and out.detector is learner.detector
    fresh = [float(out.detector.maps_and_scores(e)[1][0]) for _, e in kept]
    assert [r.result_id for r in out.rescored] == [1, 2]
    assert [r.score for r in out.rescored] == pytest.approx(fresh, rel=1e-5)
    assert all(not r.anomaly_map.flags.writeable for r in out.rescored)  # shared with the view: read-only


def test_a_label_that_turns_a_confirmed_defect_ok_counts_it_as_flipped(fitted):
    det, ok, ng = fitted
    # the position-tied update learns the whole part: calling the confirmed defect OK flips it
    learner = FeedbackLearner(det, reweight=False, position_update=True)
    defect = load_image(ng[0])
    run_job(label_job(learner, "image_ng", defect, ng[0], None, [], CancelToken()))
    out = run_job(label_job(learner, "image_ok", defect, ng[0], None, [], CancelToken()))
    th = det.thresholds.image
    before, after = (float(d.inspect([defect])[0].score) for d in (det, out.detector))
    assert before > th >= after and out.defects_flipped == 1
    again = run_job(label_job(learner, "image_ok", defect, ng[0], None, [], CancelToken()))
    assert again.defects_flipped == 0  # already OK before this label: not flipped by it


def test_undo_returns_the_previous_model_and_the_results_rejudged_under_it(fitted):
    det, ok, ng = fitted
    img = load_image(ng[0])
    learner = FeedbackLearner(det, reweight=False)
    kept = _kept(det, ng[1:3])
    run_job(label_job(learner, "image_ok", img, ng[0], None, kept, CancelToken()))
    seen, out = _progress(undo_job(learner, kept, CancelToken()))
    assert seen == [(0, 1, "undoing the last label")]
    original = [float(det.maps_and_scores(e)[1][0]) for _, e in kept]
    assert [r.score for r in out.rescored] == pytest.approx(original, rel=1e-5)


def test_replay_applies_each_label_as_it_was_made_region_and_kind(fitted, tmp_path):
    det, ok, ng = fitted
    mask = np.zeros((64, 64), bool)
    mask[8:24, 8:24] = True
    labels = [
        Label(ng[0], file_sha256(ng[0]), "false_alarm", "m", region=RegionShape.from_mask(mask), id=3),
        Label(ng[1], file_sha256(ng[1]), "image_ok", "m", id=5),
    ]
    seen, out = _progress(replay_labels_job(FeedbackLearner(det, reweight=False), labels, CancelToken()))
    assert seen == [(0, 2, "replaying label #3"), (1, 2, "replaying label #5")]
    assert out.applied == [3, 5] and out.skipped == []
    # the same labels applied by hand: region for the first, whole part for the second
    by_hand = FeedbackLearner(det, reweight=False)
    by_hand.mark_false_alarm(load_image(ng[0]), mask)
    by_hand.mark_false_alarm(load_image(ng[1]), None)
    probe = det.embed([load_image(p) for p in ng[:3]])
    torch.testing.assert_close(out.detector.maps_and_scores(probe)[1], by_hand.detector.maps_and_scores(probe)[1])
    # and not what marking the whole first part would give
    whole = FeedbackLearner(det, reweight=False)
    whole.mark_false_alarm(load_image(ng[0]), None)
    whole.mark_false_alarm(load_image(ng[1]), None)
    assert not np.allclose(out.detector.maps_and_scores(probe)[0], whole.detector.maps_and_scores(probe)[0])


def test_a_defect_label_records_the_threshold_it_was_judged_against(fitted):
    det, ok, ng = fitted
    rec = FeedbackLearner(det, reweight=False).mark_defect(load_image(ng[0]), None)
    assert rec.threshold_before == det.thresholds.image and rec.kind == "image_ng"


def test_a_label_cancelled_while_rejudging_leaves_no_trace_even_with_a_full_undo_stack(fitted):
    """A label that fails after the model changed (here: cancelled while re-judging) is
    taken back: the learner holds the model it had before. Also when the undo stack is
    full, where a new label leaves the undo depth where it was."""
    from core.jobs import Cancelled

    det, ok, ng = fitted
    learner = FeedbackLearner(det, max_undo=1)
    img = load_image(ok[0])
    run_job(label_job(learner, "image_ok", img, ok[0], None, [], CancelToken()))
    assert learner.undo_depth == 1  # full
    before = learner.detector
    memory_before = len(before.memory)
    token = CancelToken()
    gen = label_job(learner, "image_ok", load_image(ng[0]), ng[0], None, _kept(det, ng[:2]), token)
    next(gen)  # learning
    next(gen)  # the label is in the model; re-judging starts
    assert learner.detector is not before and learner.undo_depth == 1
    token.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(gen)
    assert learner.detector is before  # undo puts back the very model before the label ...
    assert len(learner.detector.memory) == memory_before  # ... untouched by the label
    np.testing.assert_array_equal(learner.detector.thresholds.calibration_scores,
                                  before.thresholds.calibration_scores)


def test_a_replay_applies_each_label_with_the_reweighting_it_was_made_with(part_images):
    """A refit replays every label as it was made: with channel reweighting when it was made
    with it, without when not; a label from before this was recorded takes the station's
    current setting. The learner's own setting is back afterwards."""
    from types import SimpleNamespace

    ok, ng = part_images
    seen = []

    class Spy:
        reweight = False
        detector = SimpleNamespace(image_size=64, config=SimpleNamespace(bit_depth=8))

        def protect(self, embeddings):
            return len(embeddings)

        def mark_false_alarm(self, image, mask):
            seen.append(self.reweight)

        mark_defect = mark_false_alarm

    labels = [Label(p, file_sha256(p), "image_ok", "m", id=i, reweight=rw)
              for i, (p, rw) in enumerate(zip(ok[:3], (True, False, None)), start=1)]
    spy = Spy()
    out = run_job(replay_labels_job(spy, labels, CancelToken()))
    assert out.applied == [1, 2, 3] and seen == [True, False, False]
    assert spy.reweight is False
    spy.reweight = True
    run_job(replay_labels_job(spy, labels, CancelToken()))
    assert seen[3:] == [True, False, True] and spy.reweight is True


def test_a_replay_guards_the_given_parts_before_it_learns_any_label(fitted):
    """Channel weights learnt again at a refit are held to what a label made now is held to:
    the parts judged NG before the refit are protected (the guard itself:
    test_reweighting_never_passes_a_part_judged_ng) before the first label is replayed, and
    stay protected through every label of the replay."""
    det, ok, ng = fitted
    events = []

    class Learner(FeedbackLearner):
        def protect(self, embeddings):
            events.append(("protect", len(embeddings)))
            return super().protect(embeddings)

        def mark_false_alarm(self, image, mask=None):
            events.append(("label", len(self.protected_embeddings)))
            return super().mark_false_alarm(image, mask)

    parts = [det.embed([load_image(p)]) for p in ng[1:]]
    labels = [Label(p, file_sha256(p), "image_ok", "m", id=i, reweight=True) for i, p in enumerate(ok[:2], 1)]
    out = run_job(replay_labels_job(Learner(det, reweight=True), labels, CancelToken(), protect=parts))
    assert out.applied == [1, 2]
    assert events == [("protect", 2), ("label", 2), ("label", 2)]


def test_the_label_store_keeps_how_each_label_was_applied_and_an_older_store_gains_the_column(tmp_path):
    import sqlite3

    from core.labels import LabelStore

    path = tmp_path / "old.labels.sqlite"
    with LabelStore(path) as store:
        a = store.add(Label("a.png", "ab" * 32, "false_alarm", "m", reweight=True))
        b = store.add(Label("b.png", "cd" * 32, "false_alarm", "m"))
    with sqlite3.connect(path) as con:  # a store as stations before this wrote it
        con.execute("ALTER TABLE labels DROP COLUMN reweight")
    with LabelStore(path) as store:
        c = store.add(Label("c.png", "ef" * 32, "defect", "m", reweight=False))
        got = {lab.id: lab.reweight for lab in store.labels()}
    assert got == {a: None, b: None, c: False}  # the dropped column's values are gone: not recorded
    with LabelStore(tmp_path / "new.labels.sqlite") as store:
        d = store.add(Label("a.png", "ab" * 32, "false_alarm", "m", reweight=True))
        assert store.labels()[0].reweight is True and store.labels()[0].id == d


def test_the_label_store_keeps_which_part_ok_labels_added_their_image_to_the_ok_set(tmp_path):
    import sqlite3

    from core.labels import LabelStore

    with LabelStore(tmp_path / "new.labels.sqlite") as store:
        a = store.add(Label("a.png", "ab" * 32, "image_ok", "m", added_ok=True))
        b = store.add(Label("b.png", "cd" * 32, "image_ok", "m"))
        assert {lab.id: lab.added_ok for lab in store.labels()} == {a: True, b: False}
    path = tmp_path / "old.labels.sqlite"
    with sqlite3.connect(path) as con:  # a store as stations before this wrote it
        con.executescript("""
            CREATE TABLE labels (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,
                operator TEXT NOT NULL, image_path TEXT NOT NULL, image_sha256 TEXT NOT NULL,
                kind TEXT NOT NULL, region_json TEXT, region_mask BLOB, map_size INTEGER NOT NULL,
                model_id TEXT NOT NULL, score REAL, undone_at REAL, reweight INTEGER, undone_by TEXT);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema', '1');
            INSERT INTO labels (created_at, operator, image_path, image_sha256, kind, map_size, model_id)
                VALUES (1.0, 'm', 'a.png', 'ab', 'image_ok', 0, 'm');""")
    with LabelStore(path) as store:
        c = store.add(Label("c.png", "ef" * 32, "image_ok", "m", added_ok=True))
        assert [(lab.image_path, lab.added_ok) for lab in store.labels()] == [("a.png", False), ("c.png", True)]
        assert store.labels()[1].id == c
        assert store.labels()[0].score_after is None  # not recorded before it existed


def test_the_label_store_keeps_the_score_each_label_left(tmp_path):
    from core.labels import LabelStore

    with LabelStore(tmp_path / "s.labels.sqlite") as store:
        store.add(Label("a.png", "ab" * 32, "false_alarm", "m", score=71.5, score_after=40.25))
        store.add(Label("b.png", "cd" * 32, "defect", "m", score=90.0))
        assert [(lab.score, lab.score_after) for lab in store.labels()] == [(71.5, 40.25), (90.0, None)]
        rows = list(csv.DictReader(io.StringIO(store.export_csv())))
        assert [r["score_after"] for r in rows] == ["40.25", ""]
