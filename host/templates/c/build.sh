#!/usr/bin/env bash
# Builds {{name}}.wasm, a WebAssembly component, from app.c: wit-bindgen
# writes the C bindings for wit/, clang compiles a wasm32-wasi reactor
# against wasi-libc, and wasm-tools makes it a component with the WASI
# preview 1 adapter.
#
# Needs clang and lld with a wasm32-wasi sysroot (Debian: apt-get install
# clang lld wasi-libc libclang-rt-14-dev-wasm32; or wasi-sdk, with CC and
# WASI_SYSROOT set), and wit-bindgen and wasm-tools (cargo install --locked
# wit-bindgen-cli@{{wit_bindgen_cli_version}} wasm-tools@{{wasm_tools_version}}). The adapter is WASI_ADAPTER
# if set, else it is taken from the wasi-preview1-component-adapter-provider
# crate {{adapter_version}} with cargo, once, into .build/.
set -euo pipefail
cd "$(dirname "$0")"

CC=${CC:-clang}
WASI_SYSROOT=${WASI_SYSROOT:-/usr}
ADAPTER_VERSION={{adapter_version}}
die() { echo "build.sh: $*" >&2; exit 1; }

command -v "$CC" >/dev/null || die "$CC not found: install clang, lld and wasi-libc (see the top of build.sh)"
command -v wit-bindgen >/dev/null || die "wit-bindgen not found: cargo install --locked wit-bindgen-cli@{{wit_bindgen_cli_version}}"
command -v wasm-tools >/dev/null || die "wasm-tools not found: cargo install --locked wasm-tools@{{wasm_tools_version}}"
mkdir -p .build

adapter=${WASI_ADAPTER:-.build/wasi_snapshot_preview1.reactor.wasm}
if [[ ! -s $adapter ]]; then
    [[ -z ${WASI_ADAPTER:-} ]] || die "WASI_ADAPTER=$WASI_ADAPTER is not a file"
    command -v cargo >/dev/null || die "cargo not found: needed once to get the WASI preview 1 adapter (or set WASI_ADAPTER)"
    echo "getting the WASI preview 1 adapter $ADAPTER_VERSION with cargo"
    dir=.build/adapter
    mkdir -p "$dir/src"
    cat >"$dir/Cargo.toml" <<EOF
[package]
name = "write-adapter"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
wasi-preview1-component-adapter-provider = "=$ADAPTER_VERSION"

[workspace]
EOF
    cat >"$dir/src/main.rs" <<'EOF'
use std::io::Write;
fn main() {
    let bytes = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
    std::io::stdout().write_all(bytes).expect("write the adapter");
}
EOF
    (cd "$dir" && cargo run --quiet --release) >"$adapter.tmp"
    mv "$adapter.tmp" "$adapter"
fi

rm -rf .build/bindings
wit-bindgen c wit --world plugin --out-dir .build/bindings >/dev/null
"$CC" --target=wasm32-wasi --sysroot="$WASI_SYSROOT" -mexec-model=reactor -O2 -Wall -Wextra \
    -Wl,--strip-debug -I .build/bindings -o .build/{{name}}.core.wasm \
    app.c .build/bindings/plugin.c .build/bindings/plugin_component_type.o
wasm-tools component new .build/{{name}}.core.wasm \
    --adapt "wasi_snapshot_preview1=$adapter" -o {{name}}.wasm
echo "built {{name}}.wasm"
