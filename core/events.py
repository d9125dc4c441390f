"""Qt-free notifications: a tiny signal that calls its subscribers in order.

The session (:mod:`core.session`) publishes its changes through these, so a script, a test
or the Qt GUI can listen alike; the GUI re-emits them as Qt signals. Callbacks run in the
thread that emits (the session only changes on the thread that owns it).

Example:
    >>> changed = Event()
    >>> changed.connect(print)
    >>> changed.emit("recipe A")
    recipe A
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Event:
    """A list of callbacks; :meth:`emit` calls each with the same arguments."""

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> Callable[..., Any]:
        self._slots.append(slot)
        return slot

    def disconnect(self, slot: Callable[..., Any]) -> None:
        self._slots.remove(slot)

    @property
    def connected(self) -> bool:
        return bool(self._slots)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)


@dataclass
class Question:
    """A decision the session leaves to a person (the GUI shows a dialog).

    With nobody listening to :attr:`InspectionSession.question`, ``default`` is taken at once.
    """

    title: str
    text: str
    options: tuple[str, ...]
    default: str
    on_answer: Callable[[str], None]

    def answer(self, option: str) -> None:
        if option not in self.options:
            raise ValueError(f"answer must be one of {self.options}, got {option!r}")
        self.on_answer(option)
