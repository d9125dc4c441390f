"""Recipes: everything a station needs to inspect one product, in one SQLite file.

A recipe is a name, the OK image paths, the detector settings, the path of the fitted model
file and the operator's thresholds. It is stored as ``<name>.okrecipe`` (SQLite, WAL mode)
with the model saved beside it as ``<name>.okng`` (see :mod:`core.persistence`).

Example:
    >>> r = Recipe("cells", ok_paths=paths, config=DetectorConfig().to_dict())
    >>> save_recipe(r, "recipes/cells.okrecipe")
    >>> r2 = load_recipe("recipes/cells.okrecipe")
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OkngError
from .sqlitedb import connect, enable_wal, read_only_uri, retry_busy, wal_beside_is_empty, write_transaction

RECIPE_SUFFIX = ".okrecipe"
SCHEMA_VERSION = 1


class RecipeError(OkngError):
    """A recipe file is missing, damaged or from a newer station."""


@dataclass
class Recipe:
    name: str
    ok_paths: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    model_path: str | None = None  # absolute once loaded
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    #: station settings that are not the detector's: live source, engineer PIN hash, whether
    #: NG images are copied, results-log retention (see :class:`core.session.InspectionSession`)
    station: dict[str, Any] = field(default_factory=dict)


def safe_file_stem(name: str) -> str:
    stem = re.sub(r"[^\w\-. ]+", "_", name).strip(" .")
    return stem or "recipe"


def model_path_for(recipe_path: str | Path) -> Path:
    """The model file that lives beside a recipe file."""
    return Path(recipe_path).with_suffix(".okng")


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write (or overwrite) a recipe file in one transaction."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RecipeError(f"cannot save recipe {path}: folder {path.parent} does not exist")
    model = recipe.model_path
    if model is not None and Path(model).parent == path.parent:
        model = Path(model).name  # stored relative, so the folder can be moved
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "config": recipe.config,
        "model_path": model,
        "image_threshold": recipe.image_threshold,
        "pixel_threshold": recipe.pixel_threshold,
        "station": recipe.station,
    }
    def write(con: sqlite3.Connection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS ok_images (position INTEGER PRIMARY KEY, path TEXT NOT NULL)")
        con.execute("DELETE FROM meta")
        con.execute("DELETE FROM ok_images")
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.executemany("INSERT INTO ok_images VALUES (?, ?)", list(enumerate(recipe.ok_paths)))

    try:
        # Another process may save the same recipe at the same moment: the WAL switch is
        # retried and the write lock taken up front (BEGIN IMMEDIATE), so the two saves
        # serialise (the last one wins whole) instead of failing with "database is locked".
        con = connect(str(path))
        try:
            enable_wal(con)
            write_transaction(con, write)
            try:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # busy: another connection reads; the WAL is checkpointed later
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise RecipeError(f"cannot save recipe {path}: {exc}") from None
    return path


def _read_recipe(path: Path, immutable: bool) -> tuple[dict[str, Any], list[str]]:
    """The recipe file's meta table (decoded) and OK image paths, in one snapshot."""
    con = connect(read_only_uri(path, immutable), uri=True)
    try:
        def read() -> tuple[dict[str, Any], list[str]]:
            con.execute("BEGIN")  # one snapshot for both tables
            try:
                m = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
                o = [p for (p,) in con.execute("SELECT path FROM ok_images ORDER BY position")]
            finally:
                con.execute("COMMIT")
            return m, o

        return retry_busy(read)
    finally:
        con.close()


def _cannot_open(exc: sqlite3.OperationalError) -> bool:
    """SQLite could not open the file (SQLITE_CANTOPEN: e.g. a WAL-mode file read-only in a
    folder where it cannot make its "-shm" file), not a lock, an I/O error or damage."""
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    return name == "SQLITE_CANTOPEN" if name is not None else "unable to open database file" in str(exc)


def _read_as_it_stands(path: Path, attempts: int = 3) -> tuple[dict[str, Any], list[str]]:
    """Read a recipe SQLite cannot open the usual way (a read-only share): as an immutable
    file, which takes no lock, so the read counts only if the file (the real one, past any
    link) was the same before and after it and no write-ahead log beside it held part of it
    (a station saving it through another mount meanwhile). Retried a few times, then refused."""
    real = Path(os.path.realpath(path))

    def state() -> tuple[int, int, int, int] | None:
        if not wal_beside_is_empty(real):
            return None
        st = real.stat()
        return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns

    for _ in range(attempts):
        before = state()
        if before is None:
            raise sqlite3.OperationalError(
                "unable to open database file: its write-ahead log holds part of it and this folder is read-only")
        read = _read_recipe(real, immutable=True)
        if state() == before:
            return read
        time.sleep(0.05)
    raise sqlite3.OperationalError("it changed while it was read (being saved elsewhere): open it again")


def _looks_like_a_model_file(path: Path) -> bool:
    """An ``.okng`` file or any safetensors file (8-byte header length, then a JSON header):
    found trying the station, a model from ``okng fit`` opened as a recipe was called "not a
    readable OK/NG recipe (file is not a database)"."""
    if path.suffix.lower() == ".okng":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        try:
            meta, oks = _read_recipe(path, immutable=False)
        except sqlite3.OperationalError as exc:
            if not _cannot_open(exc):
                raise
            meta, oks = _read_as_it_stands(path)
    except (sqlite3.Error, json.JSONDecodeError) as exc:
        if _looks_like_a_model_file(path):
            raise RecipeError(
                f"{path.name} is a model file, not a recipe: a recipe is an .okrecipe file with its model "
                f"beside it. Open the recipe this model belongs to, inspect with the model from the "
                f"command line (okng score --model {path.name} ...), or make a recipe with okng fit ... "
                f"--recipe NAME.okrecipe") from None
        raise RecipeError(f"{path} is not a readable OK/NG recipe ({exc})") from None
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecipeError(f"{path}: recipe format {version!r} is not supported by this station")
    model = meta.get("model_path")
    if model is not None and not Path(model).is_absolute():
        model = str(path.parent / model)
    try:
        return Recipe(
            name=str(meta["name"]),
            ok_paths=[str(p) for p in oks],
            config=dict(meta.get("config") or {}),
            model_path=model,
            image_threshold=_opt_float(meta.get("image_threshold")),
            pixel_threshold=_opt_float(meta.get("pixel_threshold")),
            station=dict(meta.get("station") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecipeError(f"{path}: damaged recipe ({exc})") from None


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
