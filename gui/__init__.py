"""OK/NG Station desktop GUI (PySide6 + pyqtgraph). Only gui.controller and gui.runner touch the engine."""
from . import _pyside_workaround  # noqa: F401  (must run before any signal is emitted)
