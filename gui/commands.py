"""The station's window as ``okng`` subcommands: ``okng gui [RECIPE]`` and ``okng demo``.

The engine's command line (:mod:`core.cli`) never imports the GUI: it finds these through the
``okng.commands`` entry-point group declared in ``pyproject.toml``. Nothing here imports Qt
until a command runs, so ``okng score`` does not pay for loading PySide6.
"""
from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from .app import run_gui

    return run_gui(getattr(args, "recipe", None), demo=args.command == "demo")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``gui`` to the ``okng`` subcommands."""
    d = sub.add_parser("demo", help="open the station on the built-in ELPV solar-cell demo")
    d.set_defaults(func=_run, recipe=None)
    g = sub.add_parser("gui", help="open the station")
    g.add_argument("recipe", nargs="?", help="recipe to open")
    g.set_defaults(func=_run)
