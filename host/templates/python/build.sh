#!/usr/bin/env bash
# Builds {{name}}.wasm, a WebAssembly component, from app.py with
# componentize-py: the one on PATH, or else version {{componentize_py_version}}
# installed with pip into .venv here.
set -euo pipefail
cd "$(dirname "$0")"

if command -v componentize-py >/dev/null; then
    componentize="componentize-py"
else
    componentize=.venv/bin/componentize-py
    if [[ ! -x $componentize ]]; then
        command -v python3 >/dev/null || { echo "build.sh: python3 not found: install Python 3.10 or later" >&2; exit 1; }
        echo "installing componentize-py {{componentize_py_version}} into .venv"
        python3 -m venv .venv
        .venv/bin/pip install --quiet --disable-pip-version-check "componentize-py=={{componentize_py_version}}"
    fi
fi
"$componentize" -d wit -w plugin componentize -p . app -o {{name}}.wasm
echo "built {{name}}.wasm"
