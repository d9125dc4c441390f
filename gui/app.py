"""Entry points: ``okng gui`` -> :func:`run_gui`, ``okng demo`` -> :func:`run_demo`.

The composition root: the only place the runner, controller and window are built.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from PySide6.QtWidgets import QApplication

log = logging.getLogger(__name__)


def _preload_engine_modules() -> None:
    """Import the engine's heavy modules now, on the UI thread, before the window shows.

    Otherwise the engine thread imports timm (about a second of module loading) during the
    first fit while holding the import lock, and every import PySide6 makes on the UI thread
    meanwhile (its signature loader imports lazily) waits for it: measured UI stalls of
    160-310 ms during the first fit (benchmarks/bench_gui.py).
    """
    import safetensors.torch  # noqa: F401
    import timm  # noqa: F401
    import timm.layers  # noqa: F401

    try:  # the compiled scoring kernel's compiler; it compiles (or loads its cache) lazily
        import core.models._mahalanobis_kernel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken numba/llvmlite only costs speed
        log.warning("numba unavailable (%s); scoring falls back to torch.bmm", exc)


def build(settings=None):
    """Create (or reuse) the QApplication and return (app, controller, window)."""
    from core.allocator import tune_allocator

    from .controller import StationController
    from .main_window import MainWindow
    from .runner import EngineRunner

    app = QApplication.instance() or QApplication(sys.argv[:1])
    _preload_engine_modules()
    app.setApplicationName("OK-NG Station")
    app.setOrganizationName("OKNG")
    tune_allocator()
    runner = EngineRunner()
    controller = StationController(runner)
    window = MainWindow(controller, settings)
    runner.setParent(controller)
    controller.setParent(window)
    return app, controller, window


def show_splash(app):
    """A splash within a second of start: torch and timm take ~6 s to import on a 2-core
    machine (benchmarks/bench_startup.py), and the operator should see the station coming."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QColor, QFont, QPainter, QPixmap
    from PySide6.QtWidgets import QSplashScreen

    pix = QPixmap(560, 170)
    pix.fill(QColor("#20262e"))
    p = QPainter(pix)
    p.setPen(QColor("white"))
    p.setFont(QFont("Sans", 26, QFont.Weight.Bold))
    p.drawText(pix.rect().adjusted(0, -30, 0, 0), Qt.AlignmentFlag.AlignCenter, "OK/NG Station")
    p.end()
    splash = QSplashScreen(pix)
    splash.show()
    splash.showMessage("Loading the inspection engine…", Qt.AlignmentFlag.AlignBottom | Qt.AlignmentFlag.AlignHCenter,
                       QColor("#cfd8dc"))
    app.processEvents()
    return splash


_garbage_collector = None


def collect_garbage_on_ui_thread() -> None:
    """Python's cycle collector runs in whichever thread happens to allocate. When that is a
    worker (the line link's server threads, the engine, a live source's read-ahead) and the
    garbage holds a Qt widget, the widget is deleted off the UI thread and the process
    crashes. Seen as a segfault in CI: windows of earlier tests waiting for collection while
    the line link's threads ran. So the automatic collector is switched off and pyqtgraph's
    GarbageCollector collects on a UI-thread timer, with the usual generation thresholds."""
    global _garbage_collector
    from pyqtgraph.util.garbage_collector import GarbageCollector

    if _garbage_collector is None:  # its timer lives as long as the process
        _garbage_collector = GarbageCollector(interval=0.5)


def run_gui(recipe_path: str | None = None, demo: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("asyncua", "pymodbus"):  # serving the line: ~1,100 lines of asyncua INFO at start
        logging.getLogger(chatty).setLevel(logging.WARNING)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    collect_garbage_on_ui_thread()
    splash = show_splash(app)
    app, controller, window = build()
    if demo:
        controller.session.open_demo()
    elif recipe_path:
        window.open_recipe(recipe_path)
    window.show()
    splash.finish(window)
    ready_file = os.environ.get("OKNG_READY_FILE")
    if ready_file:
        from PySide6.QtCore import QTimer

        QTimer.singleShot(0, lambda: write_ready_file(ready_file, window, controller.session))
    return app.exec()


def write_ready_file(path: str, window, session) -> None:
    """Say, once the window has been shown and painted, that the station is up (``OKNG_READY_FILE``).

    For the installer's smoke test (packaging/smoke_test.sh) and start-up measurements: a JSON
    object with the wall-clock ``time`` (compared with the launch time outside the process), the
    window's title, size and visibility, and the recipe with its number of OK images.
    """
    info = {
        "time": time.time(), "title": window.windowTitle(), "visible": window.isVisible(),
        "width": window.width(), "height": window.height(),
        "recipe": session.recipe.name, "ok_images": len(session.recipe.ok_paths),
        "frozen": bool(getattr(sys, "frozen", False)),
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, path)
    log.info("ready: %s", info)


def run_demo() -> int:
    """Open the ELPV demo recipe, ready to Fit with one click."""
    return run_gui(demo=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="okng-gui", description="OK/NG Station")
    parser.add_argument("recipe", nargs="?", help="recipe file (.okrecipe) to open")
    parser.add_argument("--demo", action="store_true", help="open the ELPV solar-cell demo")
    args = parser.parse_args(argv)
    return run_gui(args.recipe, demo=args.demo)


if __name__ == "__main__":
    sys.exit(main())
