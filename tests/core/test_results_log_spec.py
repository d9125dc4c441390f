"""The results log, specified where mutation testing found it unspecified (issue 18): a companion
write in the same transaction (the line's part id: both or neither), counters since a given
time, rates when only one kind of truth is known; (round 6) zeros for the verdicts a shift has
not seen, a row committed when ``add`` returns, retention applied as rows are logged, a backup
that is a whole copy."""
from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from core.results_log import LogEntry, ResultsLog


def _entry(t, verdict, truth=None):
    return LogEntry(t, "p.png", "ab" * 32, 1.0, verdict, 5.0, 7.0, "m@1", "ana", truth)


def _side_table(con, rowid):
    con.execute("CREATE TABLE IF NOT EXISTS side (inspection INTEGER)")
    con.execute("INSERT INTO side VALUES (?)", (rowid,))


def test_a_companion_write_lands_in_the_same_transaction_as_its_row(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        rowid = log.add(_entry(1.0, "OK"), also=_side_table)
        assert [e.id for e in log.entries()] == [rowid]
    with ResultsLog(tmp_path / "r.sqlite") as again:  # both on disk
        assert [e.id for e in again.entries()] == [rowid]
    with closing(sqlite3.connect(tmp_path / "r.sqlite")) as con:
        assert con.execute("SELECT inspection FROM side").fetchall() == [(rowid,)]


def test_when_the_companion_write_fails_the_row_is_not_logged_either(tmp_path):
    def refuse(con, rowid):
        _side_table(con, rowid)
        raise OSError("the line store refused")

    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.add(_entry(1.0, "OK"))
        with pytest.raises(OSError, match="refused"):
            log.add(_entry(2.0, "NG"), also=refuse)
        assert [e.time for e in log.entries()] == [1.0]  # neither the row ...
        assert log.counters(since=0.0).total == 1
        log.add(_entry(3.0, "OK"), also=_side_table)  # ... nor a half-open transaction left behind
    with ResultsLog(tmp_path / "r.sqlite") as again:
        assert [e.time for e in again.entries()] == [3.0, 1.0]


def test_counters_since_a_given_time_count_from_that_time_not_from_the_shift_start(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.reset_counters(now=0.0)
        for t, v in [(10.0, "OK"), (20.0, "NG"), (30.0, "OK"), (40.0, "OK")]:
            log.add(_entry(t, v))
        c = log.counters(since=25.0)
        assert (c.since, c.total, c.ok, c.ng, c.first, c.last) == (25.0, 2, 2, 0, 30.0, 40.0)
        assert log.counters().total == 4  # the shift's own counters are unchanged


def test_rates_when_only_ok_parts_or_only_ng_parts_have_a_known_truth(tmp_path):
    with ResultsLog(tmp_path / "ok.sqlite") as log:
        log.reset_counters(now=0.0)
        for verdict in ("OK", "OK", "OK", "NG"):
            log.add(_entry(1.0, verdict, "OK"))
        assert log.counters().rates() == {"detection_rate": None, "false_alarm_rate": pytest.approx(0.25)}
    with ResultsLog(tmp_path / "ng.sqlite") as log:
        log.reset_counters(now=0.0)
        for verdict in ("NG", "OK"):
            log.add(_entry(1.0, verdict, "NG"))
        assert log.counters().rates() == {"detection_rate": pytest.approx(0.5), "false_alarm_rate": None}


def test_counters_of_a_shift_with_one_kind_of_verdict_count_the_others_as_zero(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        log.reset_counters(now=0.0)
        c = log.counters()
        assert (c.total, c.ok, c.ng, c.unjudged) == (0, 0, 0, 0)
        log.add(_entry(1.0, "NG"))
        c = log.counters()
        assert (c.total, c.ok, c.ng, c.unjudged) == (1, 0, 1, 0)  # zeros, not "none"
        assert c.yield_rate == 0.0


def test_a_backup_is_a_whole_copy_of_the_log_at_the_given_path(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        for t, v in [(1.0, "OK"), (2.0, "NG")]:
            log.add(_entry(t, v))
        log.backup_to(tmp_path / "copy.sqlite")
        assert (tmp_path / "copy.sqlite").is_file()
    with ResultsLog(tmp_path / "copy.sqlite") as copy:
        assert [(e.time, e.verdict) for e in copy.entries()] == [(2.0, "NG"), (1.0, "OK")]


def test_a_copy_over_an_existing_log_sets_it_aside_with_its_wal_and_never_mixes_them(tmp_path):
    """Saving a recipe over another one: the old log (here as a crash left it, rows still in
    its WAL file) is copied aside whole, and the log in its place holds the new log only."""
    import shutil

    old = tmp_path / "old.sqlite"
    log = ResultsLog(old)
    log._db.execute("PRAGMA wal_autocheckpoint=0")
    for t in (1.0, 2.0, 3.0):
        log.add(_entry(t, "OK"))
    target = tmp_path / "station.results.sqlite"
    for suffix in ("", "-wal"):  # the files as they are while the process still runs: a crash
        shutil.copy(str(old) + suffix, str(target) + suffix)
    assert (tmp_path / "station.results.sqlite-wal").stat().st_size > 0
    log.close()
    with ResultsLog(tmp_path / "new.sqlite") as new:
        new.add(_entry(9.0, "NG"))
        aside = new.copy_over(target)
    assert aside is not None and aside.startswith(str(target) + ".replaced-")
    assert not (tmp_path / "station.results.sqlite-wal").exists() or \
        (tmp_path / "station.results.sqlite-wal").stat().st_size == 0
    with ResultsLog(target) as copy:
        assert [(e.time, e.verdict) for e in copy.entries()] == [(9.0, "NG")]
    with ResultsLog(aside) as kept:
        assert [e.time for e in kept.entries()] == [3.0, 2.0, 1.0]  # its WAL came along


def test_a_copy_over_that_fails_leaves_the_target_as_it_was_and_nothing_beside_it(tmp_path, monkeypatch):
    """A full disk in the middle of a save: the target keeps its content, and neither the copy
    set aside nor a half-written new file is left to fill the disk further."""
    from core import sqlitedb

    target = tmp_path / "station.results.sqlite"
    with ResultsLog(target) as old:
        old.add(_entry(1.0, "OK"))
    with ResultsLog(tmp_path / "new.sqlite") as new:
        new.add(_entry(9.0, "NG"))

        def full(fn, *a, **kw):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(sqlitedb, "retry_busy", full)  # the in-place copy, after the one aside
        with pytest.raises(sqlite3.OperationalError):
            new.copy_over(target)
        def half_written(con, part):
            Path(part).write_bytes(b"SQLite format 3\x00 and then the disk was full")
            raise OSError("disk full")

        monkeypatch.setattr(sqlitedb, "backup_to", half_written)
        with pytest.raises(OSError):
            new.copy_over(tmp_path / "elsewhere" / "station.results.sqlite")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "station" in p.name) == \
        ["station.results.sqlite"]
    with ResultsLog(target) as kept:
        assert [e.time for e in kept.entries()] == [1.0]


def test_putting_back_needs_the_copy_set_aside(tmp_path):
    """Undoing a copy over a log puts the one set aside back; when that copy has gone, it
    says so and leaves the target alone (never an empty database in its place)."""
    from core import sqlitedb

    target = tmp_path / "station.results.sqlite"
    with ResultsLog(target) as old:
        old.add(_entry(1.0, "OK"))
    with ResultsLog(tmp_path / "new.sqlite") as new:
        new.add(_entry(9.0, "NG"))
        aside = new.copy_over(target)
        again = new.copy_over(target)  # a second save over it: one more copy aside
    sqlitedb.put_back(target, again)
    with ResultsLog(target) as log:
        assert [e.time for e in log.entries()] == [9.0]  # the content before that second copy
    assert not Path(again).exists()
    Path(aside).unlink()
    with pytest.raises(sqlite3.Error):
        sqlitedb.put_back(target, aside)
    with ResultsLog(target) as log:
        assert [e.time for e in log.entries()] == [9.0]


def test_the_retention_limits_apply_as_inspections_are_logged_not_only_when_asked(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:  # a log kept without limits so far
        for i in range(12):
            log.add(_entry(float(i), "OK"))
    with ResultsLog(tmp_path / "r.sqlite", max_rows=5) as log:
        log.add(_entry(12.0, "OK"))  # the first inspection of a run applies the limits at once
        assert [e.time for e in log.entries(limit=None)] == [12.0, 11.0, 10.0, 9.0, 8.0]
        for i in range(13, 250):
            log.add(_entry(float(i), "OK"))
        assert 5 <= len(log.entries(limit=None)) < 5 + 100  # checked every 100 rows or sooner


def test_a_logged_inspection_is_committed_when_add_returns(tmp_path):
    with ResultsLog(tmp_path / "r.sqlite") as log:
        for t in (1.0, 2.0, 3.0):
            log.add(_entry(t, "OK"))
            with closing(sqlite3.connect(tmp_path / "r.sqlite")) as other:  # another reader sees it at once
                assert other.execute("SELECT COUNT(*) FROM inspections").fetchone() == (int(t),)


def test_file_names_with_uri_characters_open_read_only_and_nothing_is_created(tmp_path):
    """Recipes and stores are named by people: '#', '?', '%', spaces and accents open as the
    files they name, read-only, and a name that does not exist is an error, not a new file."""
    from core.recipes import Recipe, load_recipe, save_recipe
    from core.sqlitedb import read_only_uri

    for name in ("a#b", "e?f", "c%41d", "we ird ü"):
        path = tmp_path / f"{name}.okrecipe"
        save_recipe(Recipe(name, ["x.png"], {}), path)
        assert load_recipe(path).name == name
        with pytest.raises(sqlite3.OperationalError):
            with closing(sqlite3.connect(read_only_uri(tmp_path / f"{name}-missing.sqlite"), uri=True)) as con:
                con.execute("SELECT 1 FROM sqlite_master").fetchall()
    made = [p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))]  # SQLite's own
    assert sorted(made) == sorted(f"{n}.okrecipe" for n in ("a#b", "e?f", "c%41d", "we ird ü"))
    assert read_only_uri("/srv/a b/#1").startswith("file:///srv/a%20b/%231?mode=ro")


def test_a_recipe_in_a_folder_sqlite_may_not_write_opens_as_it_stands(tmp_path, monkeypatch):
    """A recipe (a WAL-mode SQLite file) copied to a read-only share: SQLite cannot make the
    "-shm" file it needs to open it the usual way ("unable to open database file"; measured
    on a read-only mount). It is read as the file stands, unless a write-ahead log beside it
    holds part of the recipe: then the error says so rather than giving an older recipe."""
    import core.recipes as recipes

    path = tmp_path / "cells.okrecipe"
    recipes.save_recipe(recipes.Recipe("cells", ["x.png"], {}, image_threshold=4.5), path)
    real = recipes.connect

    def read_only_share(target: str, **kw):  # what SQLite does there without the "-shm" file
        if "immutable=1" not in target:
            raise sqlite3.OperationalError("unable to open database file")
        return real(target, **kw)

    monkeypatch.setattr(recipes, "connect", read_only_share)
    loaded = recipes.load_recipe(path)
    assert (loaded.name, loaded.ok_paths, loaded.image_threshold) == ("cells", ["x.png"], 4.5)
    (tmp_path / "current.okrecipe").symlink_to(path)  # opened through a link: its log is the file's
    (tmp_path / "cells.okrecipe-wal").write_bytes(b"\0" * 32)  # part of the recipe is in its log
    for name in ("cells.okrecipe", "current.okrecipe"):
        with pytest.raises(recipes.RecipeError, match="not a readable OK/NG recipe .unable to open.*write-ahead log"):
            recipes.load_recipe(tmp_path / name)
    (tmp_path / "cells.okrecipe-wal").unlink()

    def locked(target: str, **kw):  # any other failure is the error, never a read without locks
        assert "immutable=1" not in target
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(recipes, "connect", locked)
    with pytest.raises(recipes.RecipeError, match="database is locked"):
        recipes.load_recipe(path)


def test_a_recipe_read_without_locks_is_refused_if_it_changed_meanwhile(tmp_path, monkeypatch):
    """Read as the file stands (no locks), a recipe saved through another mount during the
    read could mix two versions: the file is compared before and after, and read again."""
    import core.recipes as recipes

    path = tmp_path / "cells.okrecipe"
    recipes.save_recipe(recipes.Recipe("v1", ["a.png"], {}), path)
    real_read = recipes._read_recipe
    saves = iter([recipes.Recipe("v2", ["b.png"], {}), None])

    def saved_meanwhile(p, immutable):
        out = real_read(p, immutable)
        nxt = next(saves, None)
        if nxt is not None:
            time.sleep(0.01)
            recipes.save_recipe(nxt, path)  # another station, between this read and its check
        return out

    monkeypatch.setattr(recipes, "_read_recipe", saved_meanwhile)
    assert recipes._read_as_it_stands(path)[0]["name"] == "v2"  # the first read did not count
    monkeypatch.setattr(recipes, "_read_recipe", lambda p, immutable: (
        recipes.save_recipe(recipes.Recipe("again", [], {}), path), real_read(p, immutable))[1])
    with pytest.raises(sqlite3.OperationalError, match="changed while it was read"):
        recipes._read_as_it_stands(path)
