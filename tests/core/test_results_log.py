"""The results log and shift counters: every inspection kept, counted, exportable, pruned."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from core.results_log import LogEntry, ResultsLog, truth_from_path


def _entry(t, verdict, truth=None, path="p.png", score=1.0):
    return LogEntry(t, path, "ab" * 32, score, verdict, 5.0, 7.0, "m@1", "ana", truth)


def test_counters_count_since_the_shift_start_and_never_count_no_verdict_as_ok(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.reset_counters(now=1000.0)
        log.add(_entry(900.0, "NG"))  # before the shift: in the log, not in the counters
        for t, v in [(1000.0, "OK"), (1030.0, "OK"), (1060.0, "NG"), (1090.0, "?"), (1120.0, "ERROR")]:
            log.add(_entry(t, v))
        c = log.counters()
        assert (c.total, c.ok, c.ng, c.unjudged, c.errors) == (4, 2, 1, 1, 1)  # a failed cycle is no part judged
        assert c.yield_rate == pytest.approx(2 / 3)  # of the judged parts only
        assert c.parts_per_minute == pytest.approx(4 / 90 * 60)  # 4 parts, the last 90 s after the shift started
        assert len(log.entries()) == 6 and log.entries()[0].verdict == "ERROR"  # newest first
        assert [e.verdict for e in log.entries(ng_only=True)] == ["NG", "NG"]
        assert [e.verdict for e in log.entries(ng_only=True, since=1000.0)] == ["NG"]


def test_confusion_and_rates_when_the_truth_is_known(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.reset_counters(now=0.0)
        for truth, verdict, n in [("OK", "OK", 7), ("OK", "NG", 1), ("NG", "NG", 3), ("NG", "OK", 1)]:
            for i in range(n):
                log.add(_entry(10.0 + i, verdict, truth))
        log.add(_entry(50.0, "NG", None))  # unknown truth: counted, not in the confusion matrix
        c = log.counters()
        assert c.confusion == {("OK", "OK"): 7, ("OK", "NG"): 1, ("NG", "NG"): 3, ("NG", "OK"): 1}
        assert c.rates() == {"detection_rate": pytest.approx(0.75), "false_alarm_rate": pytest.approx(0.125)}


def test_truth_from_folder_names():
    assert truth_from_path("/line/ok/a.png") == "OK" and truth_from_path("/x/Good/b.png") == "OK"
    assert truth_from_path("/x/NG/sub/c.png") == "NG" and truth_from_path("/x/defect/d.png") == "NG"
    assert truth_from_path("/x/cells/e.png") is None and truth_from_path(None) is None
    assert truth_from_path("/ok/ng/f.png") == "NG"  # the nearest folder decides


def test_retention_keeps_the_newest_rows_and_drops_old_ones(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite", max_rows=5, max_age_days=1.0) as log:
        for i in range(12):
            log.add(_entry(float(i), "OK"))
        before = len(log.entries())
        assert log.prune(now=12.0) == before - 5  # it says how many went
        assert [e.time for e in log.entries()] == [11.0, 10.0, 9.0, 8.0, 7.0]
        assert log.prune(now=86400.0 + 9.5) == 3  # older than a day
        assert [e.time for e in log.entries()] == [11.0, 10.0]
        assert log.prune(now=86400.0 + 9.5) == 0


def test_export_is_csv_oldest_first_with_formulas_neutralised(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.add(_entry(1.0, "OK", path="=cmd|calc.png"))
        log.add(_entry(2.0, "NG", path="/b.png"))
        lines = log.export_csv().splitlines()
    assert lines[0].startswith("iso_time,time,image_path")
    assert "'=cmd|calc.png" in lines[1] and "/b.png" in lines[2]
    # each row's own time, in local time (not the time of the export)
    assert lines[1].startswith(time.strftime("%Y-%m-%dT%H:%M:%S,", time.localtime(1.0)))


def test_rows_survive_a_new_connection(tmp_path):
    path = tmp_path / "r.sqlite"
    log = ResultsLog(path)
    log.add(_entry(1.0, "NG"))
    # no close(): a crashed station leaves the connection open; another process reads the row
    with ResultsLog(path) as other:
        assert [e.verdict for e in other.entries()] == ["NG"]
    log.close()


def _create(path, q):
    try:
        with ResultsLog(path) as log:
            log.add(_entry(1.0, "OK"))
        q.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        q.put(repr(exc))


def test_two_processes_creating_the_log_at_once_both_succeed(tmp_path):
    ctx = mp.get_context("spawn")
    for trial in range(3):
        path = tmp_path / f"race{trial}.sqlite"
        q = ctx.Queue()
        procs = [ctx.Process(target=_create, args=(path, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(q.get(timeout=5) for _ in procs) == ["ok", "ok"]
        with ResultsLog(path) as log:
            assert len(log.entries()) == 2


def test_entries_can_be_limited_to_the_newest(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        for i in range(5):
            log.add(_entry(float(i), "OK"))
        assert [e.time for e in log.entries(limit=2)] == [4.0, 3.0]
        assert len(log.entries(limit=None)) == 5
