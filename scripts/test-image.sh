#!/usr/bin/env bash
# The container image's test, in a step of its own: deploy/image.sh builds a
# static wasm-echo, a second compile of everything (wasmtime included) the
# first time, which scripts/test.sh's time on a fresh machine has no room
# for, so it is run by hand (see the README's Testing section). It builds the image into
# target/image, then runs tests/e2e/image.rs (ignored in the rest of the
# suite), which rebuilds it through the same script into a scratch folder,
# unpacks it with umoci and serves from the binary it holds.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
start=$SECONDS
deploy/image.sh target/image
echo "test-image: deploy/image.sh took $((SECONDS - start))s" >&2
timeout --kill-after=30s 20m cargo test --release --test e2e -- --ignored image::
