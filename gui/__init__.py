"""OK/NG Station desktop GUI (PySide6 + pyqtgraph). Only gui.controller and gui.runner touch the engine."""
