"""A session's SQLite stores (labels, results log) carried beside a recipe being saved, and
put back when that save stops: the recipe left there stays paired with its own stores.

The copies run on the engine thread, in the save's own job before its model: a results log
grows with every inspection (1 M rows, ~190 MB, took 2 s to copy) and the window must not
stop for it. The job reads each store through a connection of its own (WAL: a consistent
snapshot beside the session's connection); the session starts no save while another job
runs and lets nothing write the stores while the save runs, so the snapshot is the whole
store. Put-backs (a save that stopped) run on the UI thread: a failure path, and it
restores only what the save replaced."""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import sqlitedb
from .errors import OkngError
from .jobs import CancelToken, Progress

if TYPE_CHECKING:
    from .session import InspectionSession


@dataclass(frozen=True)
class StoreCopy:
    """A store at ``source`` that must follow the recipe: to ``target``."""

    source: Path
    target: Path
    what: str  # "labels", "results log": for messages


@dataclass(frozen=True)
class CarriedStore:
    """A store copied to ``target``; ``aside``: where the one it replaced went (None: none was)."""

    target: Path
    aside: str | None
    what: str


class StoreNotCarried(OkngError):
    """A store could not be copied beside the recipe: the recipe must not be saved there (a
    recipe saved where its labels could not follow would replay another recipe's labels)."""


def stores_to_carry(session: InspectionSession, recipe_path: Path) -> list[StoreCopy]:
    """The session's stores that must be copied for a save to ``recipe_path``: none when it
    is where they already are. Each is opened here (created empty if it was not yet), so
    the job has a file to read."""
    copies = []
    for what, suffix, open_store in (("labels", ".labels.sqlite", session.labels.store),
                                     ("results log", ".results.sqlite", session.shift.log)):
        target = Path(recipe_path).with_suffix(suffix)
        source = Path(open_store().path)
        if not sqlitedb.same_file(source, target):
            copies.append(StoreCopy(source, target, what))
    return copies


def copy_store(source: Path, target: Path) -> str | None:
    """:func:`core.sqlitedb.copy_over` from a connection of this thread's own."""
    con = sqlitedb.connect(os.fspath(source))
    try:
        return sqlitedb.copy_over(con, target)
    finally:
        con.close()


def carry_job(copies: list[StoreCopy], carried: list[CarriedStore],
              token: CancelToken) -> Generator[Progress, None, None]:
    """Copy each store over its target (engine thread), appending to ``carried`` as each
    lands so that a save stopped later (a full disk at the model, a cancel) can put back
    exactly those. Raises :class:`StoreNotCarried` with the reason."""
    for i, copy in enumerate(copies):
        yield Progress(i, len(copies), f"copying the {copy.what} beside {copy.target.with_suffix('').name}")
        try:
            aside = copy_store(copy.source, copy.target)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise StoreNotCarried(f"Recipe NOT saved: the {copy.what} could not be copied beside it ({exc})") from exc
        carried.append(CarriedStore(copy.target, aside, copy.what))


def say_where_replaced_went(carried: list[CarriedStore], session: InspectionSession) -> None:
    for store in carried:
        if store.aside is not None:
            session.status.emit(f"The replaced recipe's {store.what}: kept in {store.aside}")


def put_back_carried(carried: CarriedStore, session: InspectionSession) -> None:
    """The save stopped after ``carried`` was copied: what was at its target goes back (a
    target the save created is removed)."""
    try:
        sqlitedb.put_back(carried.target, carried.aside)
    except (sqlite3.Error, OSError) as exc:
        kept = f"; its own {carried.what}: in {carried.aside}" if carried.aside else ""
        session.error.emit(f"The {carried.what} beside {carried.target.name} could not be put back ({exc}){kept}")
        return
    if carried.aside is not None:
        session.status.emit(f"Put back beside the recipe: its own {carried.what} ({carried.target.name})")
