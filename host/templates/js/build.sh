#!/usr/bin/env bash
# Builds {{name}}.wasm, a WebAssembly component, from app.js with
# componentize-qjs (the QuickJS engine): the one in node_modules, or on
# PATH, or else installed with `npm install` (package.json).
set -euo pipefail
cd "$(dirname "$0")"

if [[ -x node_modules/.bin/componentize-qjs ]]; then
    componentize=node_modules/.bin/componentize-qjs
elif command -v componentize-qjs >/dev/null; then
    componentize="componentize-qjs"
else
    command -v npm >/dev/null || { echo "build.sh: npm not found: install Node.js 20 or later" >&2; exit 1; }
    npm install --no-audit --no-fund
    componentize=node_modules/.bin/componentize-qjs
fi
# QuickJS rather than componentize-js's SpiderMonkey, whose garbage from
# every call is only collected past wasm-echo's 64 MiB memory cap. --sync:
# wasm-echo calls plugins without the component-model async ABI.
"$componentize" --wit wit --world plugin --js app.js --sync -o {{name}}.wasm
echo "built {{name}}.wasm"
