"""Work around a PySide6 6.12.0 reference-count bug: ``SignalInstance.emit()`` returns ``True``
without taking a reference, so every emit from Python (ours, pyqtgraph's, pytest-qt's) drops
one reference to ``True``; after a few hundred emits CPython aborts with
"Fatal Python error: bool_dealloc". The same happens to ``None`` on a long live run: the
10,000-frame GUI soak (benchmarks/bench_gui.py) aborted with "none_dealloc" after a few
thousand frames. On CPython < 3.12 we make ``True``, ``False`` and ``None`` effectively
immortal, which is what CPython 3.12+ does itself (PEP 683). Harmless on fixed PySide versions.
"""
from __future__ import annotations

import ctypes
import sys

_BOOST = 1 << 40


def apply() -> None:
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 12):
        return  # PEP 683: bools are immortal already
    for obj in (True, False, None):
        ref = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt is the first field of PyObject
        if ref.value < _BOOST:
            ref.value += _BOOST


apply()
