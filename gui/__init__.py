"""OK/NG Station desktop GUI (PySide6 + pyqtgraph): views, panels and a thin controller.

The station's state and jobs live in the Qt-free :class:`core.session.InspectionSession`;
``gui.controller`` adapts its notifications to Qt signals and ``gui.runner`` runs its jobs on
one engine thread. Panels and views import no engine code (import-linter, pyproject.toml).
"""
from . import _pyside_workaround  # noqa: F401  (must run before any signal is emitted)
