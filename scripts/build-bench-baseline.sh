#!/usr/bin/env bash
# Builds the benchmark's C baseline (bench/c/epoll-echo.c): a single-threaded
# epoll and recvmmsg/sendmmsg echo server, run by `wasm-echo-bench` as a
# process of its own to compare server CPU per message and tail latency with
# a server that is not tokio. Usage: scripts/build-bench-baseline.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench/epoll-echo}
mkdir -p "$(dirname "$out")"
gcc -std=c11 -O2 -Wall -Wextra -Werror -o "$out" bench/c/epoll-echo.c
