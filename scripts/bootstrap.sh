#!/usr/bin/env bash
# Installs what a fresh machine lacks to build wasm-echo: the wasm32-wasip2
# Rust target, which the guest plugins are compiled for. Safe to run again:
# it does nothing when everything is there.
set -euo pipefail

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
    echo "bootstrap: installing the $target Rust target" >&2
    rustup target add "$target"
fi

# The real services the tests start on loopback (nginx, prometheus, ...).
"$(dirname "$0")/install-debian.sh"
