"""A session's SQLite stores (labels, results log) carried beside a recipe being saved, and
put back when that save stops: the recipe left there stays paired with its own stores."""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .sqlitedb import put_back

if TYPE_CHECKING:
    from .session import InspectionSession


@dataclass(frozen=True)
class CarriedStore:
    """A store copied to ``target``; ``aside``: where the one it replaced went (None: none was)."""

    target: Path
    aside: str | None
    what: str  # "labels", "results log": for messages


def carry(copy_over: Callable[[Path], str | None], target: Path, session: InspectionSession,
          what: str) -> CarriedStore | None:
    """Copy a store over ``target`` (``copy_over``: the store's own); None (and "Recipe NOT
    saved" on screen) if it could not be, and the recipe must not be saved there."""
    try:
        aside = copy_over(target)
    except (sqlite3.Error, OSError, ValueError) as exc:
        session.error.emit(f"Recipe NOT saved: the {what} could not be copied beside it ({exc})")
        return None
    if aside is not None:
        session.status.emit(f"The replaced recipe's {what}: kept in {aside}")
    return CarriedStore(target, aside, what)


def put_back_carried(carried: CarriedStore | None, session: InspectionSession) -> None:
    """The save stopped after ``carried`` was copied: what was at its target goes back (a
    target the save created is removed)."""
    if carried is None:
        return
    try:
        put_back(carried.target, carried.aside)
    except (sqlite3.Error, OSError) as exc:
        kept = f"; its own {carried.what}: in {carried.aside}" if carried.aside else ""
        session.error.emit(f"The {carried.what} beside {carried.target.name} could not be put back ({exc}){kept}")
        return
    if carried.aside is not None:
        session.status.emit(f"Put back beside the recipe: its own {carried.what} ({carried.target.name})")
