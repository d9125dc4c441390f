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

import json
import logging
import os
import socket
import sqlite3
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import sqlitedb
from .atomic import write_bytes_atomic
from .errors import OkngError
from .jobs import CancelToken, Progress

if TYPE_CHECKING:
    from .session import InspectionSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreCopy:
    """A store at ``source`` that must follow the recipe: to ``target``; the database already
    there goes to ``aside`` (None: there was none)."""

    source: Path
    target: Path
    what: str  # "labels", "results log": for messages
    aside: str | None = None


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
    is where they already are (then they are not even opened: a damaged results log must
    not stop the recipe from being saved in place). Each one to copy is opened here
    (created empty if it was not yet), so the job has a file to read; one that cannot be
    is a :class:`StoreNotCarried` naming the file and the way out."""
    copies = []
    for what, suffix, current, open_store in (
            ("labels", ".labels.sqlite", session.labels.store_path, session.labels.store),
            ("results log", ".results.sqlite", session.shift.path, session.shift.log)):
        target = Path(recipe_path).with_suffix(suffix)
        if sqlitedb.same_file(current, target):
            continue
        try:
            source = Path(open_store().path)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise StoreNotCarried(
                f"Recipe NOT saved there: its {what} ({current}) cannot be read ({exc}). Move that file aside "
                f"(an empty {what} then starts beside the recipe) and save again") from exc
        copies.append(StoreCopy(source, target, what, sqlitedb.aside_name(target) if target.exists() else None))
    return copies


def copy_store(source: Path, target: Path, aside: str | None = None) -> str | None:
    """:func:`core.sqlitedb.copy_over` from a connection of this thread's own."""
    con = sqlitedb.connect(os.fspath(source))
    try:
        return sqlitedb.copy_over(con, target, aside)
    finally:
        con.close()


# -- the save's journal: a save stopped by a crash is undone when the recipe is next opened --
JOURNAL_VERSION = 1


def journal_path(recipe_path: Path) -> Path:
    return Path(recipe_path).with_name(Path(recipe_path).name + ".saving")


def _file_identity(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def write_journal(recipe_path: Path, copies: list[StoreCopy], model_path: Path | None) -> None:
    """Before any store is copied over another recipe's: what will change beside
    ``recipe_path`` (each store's target and where the one there goes) and the model file as
    it is now. Found trying the station: the station killed between the copies and the
    model left the other recipe with this session's labels and results log, and nothing said
    so. Removed by :func:`remove_journal` once the save has ended either way."""
    Path(recipe_path).parent.mkdir(parents=True, exist_ok=True)  # as the recipe's own save does
    entries = [{"target": str(c.target), "aside": c.aside, "what": c.what} for c in copies]
    model = None if model_path is None else {"path": str(model_path), "before": _file_identity(model_path)}
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    write_bytes_atomic(journal_path(recipe_path), json.dumps(
        {"version": JOURNAL_VERSION, "stores": entries, "model": model, "owner": owner}).encode())


def remove_journal(recipe_path: Path) -> None:
    """Remove the journal; one that cannot be removed is logged (the save itself is done)."""
    try:
        journal_path(recipe_path).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("the save journal %s could not be removed: %s", journal_path(recipe_path), exc)


def _owner_alive(owner: object) -> bool:
    """The journal's save may still be running: its process is alive on this machine (a
    second station or ``okng serve`` must not undo a save in progress). A journal written
    on another machine is treated as stopped: its process cannot be checked from here."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process: its save has ended (the session checks before it calls)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def recover_interrupted_save(recipe_path: Path) -> str:
    """Finish what a save onto ``recipe_path`` left when its process stopped; "" when there
    was none, else what was done, for the screen. Before its model was written, each store
    goes back to what the recipe had (its copy aside put back, a store the save created
    removed); after, the stores stay with that model (its labels are theirs), as a save
    whose recipe file could not be written keeps them. A journal that cannot be read is
    left where it is, and said."""
    journal = journal_path(recipe_path)
    if not journal.exists():
        return ""
    try:
        data = json.loads(journal.read_text())
        if _owner_alive(data.get("owner")):
            return ""  # a save still running in another process: not ours to undo
        stores = [(Path(e["target"]), None if e["aside"] is None else str(e["aside"]), str(e["what"]))
                  for e in data["stores"]]
        model = data.get("model")
        written = model is not None and _file_identity(Path(model["path"])) != model["before"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _set_aside(journal)
        return (f"A save onto this recipe was interrupted and its journal cannot be read ({exc}); it is kept "
                f"as {journal.name}.failed: check the labels and results log beside the recipe")
    if written:
        remove_journal(recipe_path)
        kept = "; ".join(f"the replaced {what}: in {aside}" for _, aside, what in stores
                         if aside and Path(aside).exists())
        return ("A save onto this recipe stopped after its model was written (the station stopped): the model, "
                "labels and results log are that save's, the recipe file (OK set, thresholds) is from before. "
                "Check them and save" + (f" ({kept})" if kept else ""))
    problems = []
    for target, aside, what in stores:
        try:
            sqlitedb.remove_partial(aside)
            if aside is None:
                sqlitedb.put_back(target, None)  # the save created it
            elif Path(aside).exists():
                sqlitedb.put_back(target, aside)
        except (sqlite3.Error, OSError) as exc:
            problems.append(f"its {what} could not be put back ({exc}; the recipe's own: {aside})")
    if problems:  # undone once only: a second run would delete stores in use by then
        _set_aside(journal)
        return ("A save onto this recipe was interrupted (the station stopped): " + "; ".join(problems)
                + f" (the journal is kept as {journal.name}.failed)")
    remove_journal(recipe_path)
    return ("A save onto this recipe was interrupted (the station stopped) before its model was written: the "
            "recipe's own labels and results log were put back")


def carry_job(copies: list[StoreCopy], carried: list[CarriedStore],
              token: CancelToken) -> Generator[Progress, None, None]:
    """Copy each store over its target (engine thread), appending to ``carried`` as each
    lands so that a save stopped later (a full disk at the model, a cancel) can put back
    exactly those. Raises :class:`StoreNotCarried` with the reason."""
    for i, copy in enumerate(copies):
        yield Progress(i, len(copies), f"copying the {copy.what} beside {copy.target.with_suffix('').name}")
        try:
            if copy.target.exists() != (copy.aside is not None):  # the journal said otherwise
                raise OSError(f"{copy.target.name} appeared or went while the save waited")
            aside = copy_store(copy.source, copy.target, copy.aside)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise StoreNotCarried(f"Recipe NOT saved: the {copy.what} could not be copied beside it ({exc})") from exc
        carried.append(CarriedStore(copy.target, aside, copy.what))


def _set_aside(journal: Path) -> None:
    try:
        os.replace(journal, f"{journal}.failed")
    except OSError as exc:
        log.warning("the save journal %s could not be set aside: %s", journal, exc)


def say_where_replaced_went(carried: list[CarriedStore], session: InspectionSession) -> None:
    for store in carried:
        if store.aside is not None:
            session.status.emit(f"The replaced recipe's {store.what}: kept in {store.aside}")


def put_back_carried(carried: CarriedStore, session: InspectionSession) -> bool:
    """The save stopped after ``carried`` was copied: what was at its target goes back (a
    target the save created is removed). False (and said) when it could not be."""
    try:
        sqlitedb.put_back(carried.target, carried.aside)
    except (sqlite3.Error, OSError) as exc:
        kept = f"; its own {carried.what}: in {carried.aside}" if carried.aside else ""
        session.error.emit(f"The {carried.what} beside {carried.target.name} could not be put back ({exc}){kept}")
        return False
    if carried.aside is not None:
        session.status.emit(f"Put back beside the recipe: its own {carried.what} ({carried.target.name})")
    return True
