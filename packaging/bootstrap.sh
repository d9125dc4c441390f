#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv and install the station with its
# test extras. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c packaging/constraints.txt -e ".[test]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import core, gui, torch, timm, PySide6, pyqtgraph" \
    || { echo "bootstrap: the environment is incomplete (see pip output above)" >&2; exit 1; }
