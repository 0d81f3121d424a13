#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints (host and guest plugins),
# unit tests and the end-to-end tests against the real binary, with the
# plugins in every language.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
# The whole suite runs here: nothing may be reported as ignored for want of
# a toolchain, an address or a port (see host/build.rs).
unset WASM_ECHO_SKIP_TESTS
cargo fmt --all --check
(cd guest-plugins && cargo fmt --all --check)
cargo clippy --release --all-targets -- -D warnings
(cd guest-plugins && cargo clippy --release --target-dir ../target/guest-plugins -- -D warnings)
# The Python, JavaScript and C plugins: the end-to-end tests run against
# them too (tests/e2e/polyglot.rs) and build `wasm-echo new` projects with
# the same toolchains (tests/e2e/scaffold.rs).
scripts/build-polyglot.sh target/polyglot/out
# Compile first, then bound the run itself: a hung test fails the run in
# minutes, not at CI's limit. Each server a test starts is bounded too
# (tests/e2e/common.rs, SERVER_LIFETIME), and so is each command it runs.
cargo test --release --no-run
# The Python and JavaScript components take seconds each to compile: do it
# once here, one at a time, into the compiled-code cache the tests share
# (tests/e2e/common.rs, shared_cache_home), so that tests running side by
# side start them from the cache instead of compiling the same component
# at once against their start-up limit.
for component in target/polyglot/out/*.wasm; do
    XDG_CACHE_HOME=$PWD/target/tmp/cache-home target/release/wasm-echo check "$component" >/dev/null
done
WASM_ECHO_POLYGLOT_DIR=$PWD/target/polyglot/out \
    timeout --kill-after=30s 20m cargo test --release
# The benchmark harness, once and small, so that it cannot rot unnoticed.
# Its figures are not judged here (BENCHMARKS.md says where they are).
timeout --kill-after=30s 10m cargo run --release -q -p wasm-echo-bench -- --quick
