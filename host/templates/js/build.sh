#!/usr/bin/env bash
# Builds {{name}}.wasm, a WebAssembly component, from app.js with
# componentize-js: the one in node_modules, or on PATH, or else installed
# with `npm install` (package.json).
set -euo pipefail
cd "$(dirname "$0")"

if [[ -x node_modules/.bin/componentize-js ]]; then
    componentize=node_modules/.bin/componentize-js
elif command -v componentize-js >/dev/null; then
    componentize="componentize-js"
else
    command -v npm >/dev/null || { echo "build.sh: npm not found: install Node.js 20 or later" >&2; exit 1; }
    npm install --no-audit --no-fund
    componentize=node_modules/.bin/componentize-js
fi
# The http and fetch-event features would import wasi:http, which wasm-echo
# does not grant.
"$componentize" app.js --wit wit --world-name plugin --disable http fetch-event -o {{name}}.wasm
echo "built {{name}}.wasm"
