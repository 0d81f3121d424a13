#!/usr/bin/env bash
# Builds everything (host and guest plugins) and runs `wasm-echo serve`;
# arguments are passed on, e.g. `scripts/serve.sh --plugin echo`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
exec cargo run --release --bin wasm-echo -- serve "$@"
