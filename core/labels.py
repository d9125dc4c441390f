"""Operator labels in SQLite: what was marked, on which image, against which model, by whom.

Every label is committed before :meth:`LabelStore.add` returns (WAL journal,
``synchronous=FULL``), so a label the operator saw acknowledged on screen survives a crash
or a killed process. Undo marks a label as undone (never deletes), so the history stays
auditable and exportable.

Example:
    >>> store = LabelStore("cells.labels.sqlite")
    >>> lid = store.add(Label(image_path="p.png", image_sha256=sha, kind="false_alarm",
    ...                       region=RegionShape.from_mask(mask), model_id="...", operator="ana"))
    >>> store.undo(lid)
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import sqlitedb
from .sqlitedb import connect, enable_wal, retry_busy, write_transaction

KINDS = ("false_alarm", "defect", "image_ok", "image_ng")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    operator TEXT NOT NULL,
    image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('false_alarm', 'defect', 'image_ok', 'image_ng')),
    region_json TEXT,            -- polygon + bbox in anomaly-map coordinates, or NULL (whole image)
    region_mask BLOB,            -- PNG of the exact region mask, or NULL
    map_size INTEGER NOT NULL,   -- side of the anomaly map the region refers to
    model_id TEXT NOT NULL,
    score REAL,
    undone_at REAL,
    reweight INTEGER,            -- 1: applied with channel reweighting, 0: without, NULL: not recorded
    undone_by TEXT,              -- who undid or withdrew it (NULL: active, or not recorded)
    added_ok INTEGER,            -- 1: the label put its image into the recipe's OK set
    score_after REAL             -- the part's score right after the label (NULL: not recorded)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


@dataclass(frozen=True)
class RegionShape:
    """A marked region: outline polygon, bounding box and exact mask (map coordinates)."""

    polygon: list[tuple[int, int]]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> RegionShape:
        m = np.ascontiguousarray(mask, dtype=bool)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        poly = [tuple(int(v) for v in pt) for pt in max(contours, key=len).reshape(-1, 2)] if contours else []
        ys, xs = np.nonzero(m)
        bbox = ((int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
                if xs.size else (0, 0, 0, 0))
        return cls(poly, bbox, m)

    def mask_png(self) -> bytes:
        return cv2.imencode(".png", self.mask.astype(np.uint8) * 255)[1].tobytes()

    @staticmethod
    def mask_from_png(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) > 127


@dataclass(frozen=True)
class Label:
    image_path: str
    image_sha256: str
    kind: str
    model_id: str
    operator: str = ""
    region: RegionShape | None = None
    map_size: int = 0
    score: float | None = None
    id: int | None = None
    created_at: float | None = None
    undone_at: float | None = None
    #: applied with channel reweighting (a refit replays it the same way); None: not recorded
    #: (a store written before this existed: the refit's own setting decides)
    reweight: bool | None = None
    #: who undid or withdrew it (None: active, or undone before this was recorded)
    undone_by: str | None = None
    #: a "part is OK" that put its image into the recipe's OK set (withdrawn: it leaves it
    #: again; restored: it comes back); False in a store written before this was recorded
    added_ok: bool = False
    #: the part's image score right after the label took effect (None: not recorded)
    score_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"label kind must be one of {KINDS}, got {self.kind!r}")


class LabelStore:
    """SQLite-backed label list. One connection per store; not shared across threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Another process may be creating the same store right now (two stations opening one
        # recipe): WAL switch retried, schema + version row in one immediate transaction.
        self._db = connect(str(self.path))
        try:
            enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")

            def init(db: sqlite3.Connection) -> str:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                # a column added within schema 1 (older stations read columns by name and
                # leave it NULL): a store written before it gets it here
                have = {r[1] for r in db.execute("PRAGMA table_info(labels)")}
                for column, kind in (("reweight", "INTEGER"), ("undone_by", "TEXT"), ("added_ok", "INTEGER"),
                                     ("score_after", "REAL")):
                    if column not in have:
                        db.execute(f"ALTER TABLE labels ADD COLUMN {column} {kind}")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                return db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]

            version = write_transaction(self._db, init)
        except BaseException:
            self._db.close()
            raise
        if version != SCHEMA_VERSION:
            self._db.close()
            raise ValueError(f"{self.path}: label store schema {version} is not supported (expected {SCHEMA_VERSION})")

    def close(self) -> None:
        self._db.close()

    def ids(self) -> set[int]:
        """Every label's id, withdrawn ones included."""
        return {int(r[0]) for r in self._db.execute("SELECT id FROM labels")}

    def reserve_ids_through(self, last: int) -> None:
        """New labels get ids above ``last``: a model that learnt labels this store no longer
        holds keeps their ids, and a new label must never take one of them (it would be
        listed as learnt by a model that never saw it)."""
        def bump(db: sqlite3.Connection) -> None:
            if db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'labels'",
                          (int(last),)).rowcount == 0:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('labels', ?)", (int(last),))

        write_transaction(self._db, bump)

    def checkpoint(self) -> None:
        """Everything into the database file itself (:func:`core.sqlitedb.checkpoint`)."""
        sqlitedb.checkpoint(self._db)

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, label: Label) -> int:
        """Commit a label durably and return its id."""
        r = label.region
        cur = retry_busy(lambda: self._db.execute(
            "INSERT INTO labels (created_at, operator, image_path, image_sha256, kind, region_json, region_mask,"
            " map_size, model_id, score, reweight, added_ok, score_after)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(), label.operator, label.image_path, label.image_sha256, label.kind,
                None if r is None else json.dumps({"polygon": r.polygon, "bbox": r.bbox}),
                None if r is None else r.mask_png(),
                label.map_size, label.model_id, label.score, None if label.reweight is None else int(label.reweight),
                int(label.added_ok), label.score_after,
            ),
        ))
        return int(cur.lastrowid)

    def undo(self, label_id: int, by: str = "") -> None:
        """Mark a label undone (``by``: who undid or withdrew it); it stays in the store."""
        retry_busy(lambda: self._db.execute(
            "UPDATE labels SET undone_at=?, undone_by=? WHERE id=? AND undone_at IS NULL",
            (time.time(), by, label_id)))

    def redo(self, label_id: int) -> None:
        retry_busy(lambda: self._db.execute("UPDATE labels SET undone_at=NULL, undone_by=NULL WHERE id=?",
                                            (label_id,)))

    def labels(self, include_undone: bool = False) -> list[Label]:
        q = "SELECT * FROM labels" + ("" if include_undone else " WHERE undone_at IS NULL") + " ORDER BY id"
        cur = self._db.execute(q)
        cols = [c[0] for c in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(cols, row))
            region = None
            if d["region_json"] is not None:
                meta = json.loads(d["region_json"])
                region = RegionShape([tuple(p) for p in meta["polygon"]], tuple(meta["bbox"]),
                                     RegionShape.mask_from_png(d["region_mask"]))
            reweight = d.get("reweight")
            out.append(Label(d["image_path"], d["image_sha256"], d["kind"], d["model_id"], d["operator"], region,
                             d["map_size"], d["score"], d["id"], d["created_at"], d["undone_at"],
                             None if reweight is None else bool(reweight),
                             # an older station's redo clears undone_at only: no stale "by"
                             d.get("undone_by") if d["undone_at"] is not None else None,
                             bool(d.get("added_ok")), d.get("score_after")))
        return out

    def export_csv(self) -> str:
        """All labels (undone ones flagged) as CSV text, regions as JSON; every field the JSON
        export has (``reweight``: empty where the store predates recording it)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "created_at", "operator", "image_path", "image_sha256", "kind", "region", "model_id",
                    "score", "undone", "undone_by", "undone_at", "score_after",
                    # after the first columns (their places unchanged): what the JSON export also says
                    "map_size", "reweight", "added_ok"])
        for lab in self.labels(include_undone=True):
            region = "" if lab.region is None else json.dumps({"polygon": lab.region.polygon, "bbox": lab.region.bbox})
            w.writerow([lab.id, _iso(lab.created_at), lab.operator,
                        lab.image_path, lab.image_sha256, lab.kind, region, lab.model_id,
                        "" if lab.score is None else f"{lab.score:.6g}", "yes" if lab.undone_at else "",
                        lab.undone_by or "", _iso(lab.undone_at) if lab.undone_at else "",
                        "" if lab.score_after is None else f"{lab.score_after:.6g}",
                        lab.map_size or "", "" if lab.reweight is None else ("yes" if lab.reweight else "no"),
                        "yes" if lab.added_ok else ""])
        return buf.getvalue()

    def export_json(self) -> str:
        rows = []
        for lab in self.labels(include_undone=True):
            d = asdict(lab)
            d["region"] = None if lab.region is None else {"polygon": lab.region.polygon, "bbox": lab.region.bbox}
            rows.append(d)
        return json.dumps(rows, indent=2)


def _iso(t: float) -> str:
    """Local time, ISO 8601 to the second (the CSV export's times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
