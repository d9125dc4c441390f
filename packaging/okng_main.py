"""The built program's entry point: the ``okng`` command line (``okng demo``, ``okng score`` ...).

PyInstaller freezes this script (packaging/okng.spec); in a development install the same
``core.cli.main`` is the ``okng`` console script.
"""
import sys

from core.cli import main

if __name__ == "__main__":
    sys.exit(main())
