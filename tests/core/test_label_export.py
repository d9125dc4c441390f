"""What an exported label list says: an engineer audits feedback from these files."""
import csv
import io
import json
import time

import numpy as np

from core.labels import Label, LabelStore, RegionShape


#: 2020-03-04 05:06:07 local time: labels made then, so a clock read at export shows
CREATED = time.mktime((2020, 3, 4, 5, 6, 7, 0, 0, -1))


def _store_with_two_labels(path, monkeypatch):
    mask = np.zeros((32, 32), bool)
    mask[4:9, 10:20] = True
    store = LabelStore(path)
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: CREATED)
        region = RegionShape.from_mask(mask)
        first = store.add(Label("p.png", "ab" * 32, "false_alarm", "model-1", "ana", region, 32, 7.5,
                                score_after=3.25, reweight=True))
        store.add(Label("q.png", "cd" * 32, "image_ok", "model-2", "ben", reweight=False, added_ok=True))
    store.undo(first, by="carla")
    return store


def test_the_csv_export_has_one_row_per_label_with_every_field(tmp_path, monkeypatch):
    with _store_with_two_labels(tmp_path / "l.sqlite", monkeypatch) as store:
        labels = store.labels(include_undone=True)
        rows = list(csv.reader(io.StringIO(store.export_csv())))
    assert rows[0] == ["id", "created_at", "operator", "image_path", "image_sha256", "kind", "region", "model_id",
                       "score", "undone", "undone_by", "undone_at", "score_after", "map_size", "reweight",
                       "added_ok"]
    assert len(rows) == 3
    by_id = {int(r[0]): r for r in rows[1:]}
    for lab in labels:
        row = by_id[lab.id]
        assert lab.created_at == CREATED and row[1] == "2020-03-04T05:06:07"  # local time, ISO 8601
        assert row[2:6] == [lab.operator, lab.image_path, lab.image_sha256, lab.kind]
        assert row[7] == lab.model_id
    marked, whole = (by_id[lab.id] for lab in labels)  # labels() lists them in creation order
    region = json.loads(marked[6])
    assert region["bbox"] == [10, 4, 10, 5] and len(region["polygon"]) >= 4
    assert marked[8] == "7.5" and marked[9] == "yes" and marked[10] == "carla" and marked[11].startswith("20")
    assert whole[6] == "" and whole[8] == "" and whole[9] == "" and whole[10] == "" and whole[11] == ""
    assert marked[12] == "3.25" and whole[12] == ""  # the score right after the label, where recorded
    assert marked[13] == "32" and whole[13] == ""  # the map the region was drawn on
    assert marked[14] == "yes" and whole[14] == "no"  # applied with channel reweighting or not
    assert marked[15] == "" and whole[15] == "yes"  # a part-is-OK that joined the OK set


def test_the_json_export_keeps_undone_labels_and_their_regions(tmp_path, monkeypatch):
    with _store_with_two_labels(tmp_path / "l.sqlite", monkeypatch) as store:
        rows = json.loads(store.export_json())
    assert [r["kind"] for r in rows] == ["false_alarm", "image_ok"]
    assert rows[0]["undone_at"] is not None and rows[1]["undone_at"] is None
    assert rows[0]["region"]["bbox"] == [10, 4, 10, 5] and rows[1]["region"] is None
    assert rows[0]["score"] == 7.5 and rows[0]["operator"] == "ana" and rows[1]["model_id"] == "model-2"


def test_an_undone_label_can_be_redone(tmp_path, monkeypatch):
    with _store_with_two_labels(tmp_path / "l.sqlite", monkeypatch) as store:
        first = store.labels(include_undone=True)[0]
        assert first.undone_at is not None and [lab.kind for lab in store.labels()] == ["image_ok"]
        assert first.undone_by == "carla"
        store.redo(first.id)
        assert [lab.kind for lab in store.labels()] == ["false_alarm", "image_ok"]
        assert store.labels()[0].undone_at is None and store.labels()[0].undone_by is None


def test_a_store_written_before_undone_by_existed_gets_the_column_and_keeps_its_labels(tmp_path):
    """Stores of earlier rounds have no undone_by column: opening one adds it (NULL: not
    recorded), and an undo from then on records who."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)  # the previous round's schema, one undone label in it
    con.executescript("""
        CREATE TABLE labels (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,
            operator TEXT NOT NULL, image_path TEXT NOT NULL, image_sha256 TEXT NOT NULL,
            kind TEXT NOT NULL, region_json TEXT, region_mask BLOB, map_size INTEGER NOT NULL,
            model_id TEXT NOT NULL, score REAL, undone_at REAL, reweight INTEGER);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO labels (created_at, operator, image_path, image_sha256, kind, map_size, model_id, undone_at)
            VALUES (0.5, 'ana', 'p.png', 'ab', 'image_ng', 0, 'model-1', 1.0);
    """)
    con.close()
    with LabelStore(path) as store:
        (old,) = store.labels(include_undone=True)
        assert old.undone_at == 1.0 and old.undone_by is None
        store.redo(old.id)
        store.undo(old.id, by="ben")
        assert store.labels(include_undone=True)[0].undone_by == "ben"


def test_a_label_an_older_station_made_active_again_names_nobody_as_having_taken_it_out(tmp_path):
    """A station of an earlier round redoes a label by clearing undone_at only."""
    import sqlite3

    path = tmp_path / "l.sqlite"
    with LabelStore(path) as store:
        first = store.add(Label("p.png", "ab" * 32, "image_ng", "model-1", "ana"))
        store.undo(first, by="carla")
    con = sqlite3.connect(path)
    con.execute("UPDATE labels SET undone_at=NULL")  # what the older station's redo does
    con.commit()
    con.close()
    with LabelStore(path) as store:
        assert store.labels()[0].undone_by is None
        row = list(csv.reader(io.StringIO(store.export_csv())))[1]
    assert row[9:13] == ["", "", "", ""]
