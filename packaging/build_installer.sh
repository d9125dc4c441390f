#!/usr/bin/env bash
# Build the station's one-folder installer, dist/okng/ (PyInstaller; see README "Installer"):
# `dist/okng/okng demo`, `dist/okng/okng score ...`, with a CPU build of torch, the default
# backbone's weights and the ELPV demo inside. Not part of CI (about 4 minutes on 2 cores);
# check it with `python packaging/smoke_test.py`.
#
#   bash packaging/build_installer.sh            # PYTHON=python3.11 to choose the interpreter
#
# The build environment is its own virtualenv, build/installer-venv (the development .venv
# has CUDA torch, whose libraries would make the bundle gigabytes larger).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
venv=build/installer-venv
constraints=packaging/installer-constraints.txt
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
# a CPU build of torch: from the configured indexes or local wheels, else PyTorch's CPU index
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.endswith('+cpu'))" 2>/dev/null; then
    "${pip[@]}" install -c "$constraints" torch 2>&1 | quiet
    "$venv/bin/python" -c "import torch" 2>/dev/null \
        || "${pip[@]}" install -c "$constraints" --index-url https://download.pytorch.org/whl/cpu torch 2>&1 | quiet
fi
"${pip[@]}" install -c "$constraints" ".[installer]" 2>&1 | quiet
"$venv/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.endswith('+cpu'))" \
    || { echo "build_installer: the build environment has no CPU build of torch" >&2; exit 1; }
rm -rf build/pyinstaller dist/okng
start=$(date +%s)
"$venv/bin/pyinstaller" --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller \
    packaging/okng.spec
echo "build_installer: dist/okng/ built in $(( $(date +%s) - start )) s, $(du -sh dist/okng | cut -f1)"
