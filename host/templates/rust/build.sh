#!/usr/bin/env bash
# Builds {{name}}.wasm, a WebAssembly component, with cargo for the
# wasm32-wasip2 target (added with rustup when it is missing).
set -euo pipefail
cd "$(dirname "$0")"

if command -v rustup >/dev/null && ! rustup target list --installed | grep -x wasm32-wasip2 >/dev/null; then
    rustup target add wasm32-wasip2
fi
cargo build --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{lib_name}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
