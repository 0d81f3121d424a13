#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints (host and guest plugins),
# unit tests and the end-to-end tests against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
cargo fmt --all --check
(cd guest-plugins && cargo fmt --all --check)
cargo clippy --release --all-targets -- -D warnings
(cd guest-plugins && cargo clippy --release --target-dir ../target/guest-plugins -- -D warnings)
cargo test --release
