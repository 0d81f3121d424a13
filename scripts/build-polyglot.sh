#!/usr/bin/env bash
# Builds the Python, JavaScript and C guest plugins (hello and echo) into
# WebAssembly components for the wit/plugin.wit world, and the Python
# counter for its stateful-plugin world:
#
#   scripts/build-polyglot.sh OUTDIR
#
# writes OUTDIR/{hello,echo}-{python,js,c}.wasm, OUTDIR/counter-python.wasm,
# and OUTDIR/toolchains.env
# saying where the toolchains are (TOOLCHAIN_PATH: the directories of
# componentize-py, componentize-qjs, wit-bindgen and wasm-tools; WASI_ADAPTER:
# the preview 1 reactor adapter) for `wasm-echo new` projects and the tests
# that build them. Missing toolchains are
# installed first, under target/polyglot/ (and Debian packages for C), from
# package registries only: componentize-py from PyPI, componentize-qjs
# from npm (guest-plugins/js/package-lock.json), wit-bindgen-cli, wasm-tools
# and the WASI preview 1 adapter with cargo, clang/lld/wasi-libc from
# Debian. Run again, it reinstalls nothing and rebuilds only what changed.
# When a toolchain cannot be installed or a build fails, it stops with one
# line naming the language.
set -euo pipefail

# Pinned versions. The adapter's version follows the host's wasmtime, so that
# the C components import the WASI 0.2.x release the host provides.
COMPONENTIZE_PY_VERSION=0.25.1
WASM_TOOLS_VERSION=1.263.0
WIT_BINDGEN_VERSION=0.63.0
ADAPTER_VERSION=48.0.8
APT_PACKAGES=(clang lld wasi-libc libclang-rt-14-dev-wasm32)

# The cargo-built tools are programs for this machine, whoever runs this
# script (a build script may run it with these set for another target).
unset CARGO_BUILD_TARGET CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/target/polyglot
LOGS=$TOOLS/logs
WIT=$ROOT/wit
SELF=$ROOT/scripts/build-polyglot.sh
PLUGINS=(hello echo)

die() { echo "build-polyglot: $*" >&2; exit 1; }
# Prints the end of a failed step's log, then the one-line reason.
fail_with_log() {
    local log=$1; shift
    if [[ -f $log ]]; then
        echo "---- last lines of $log" >&2
        tail -n 25 "$log" >&2
        echo "----" >&2
    fi
    die "$*"
}
# Runs a command with its output in a log; on failure, fails with $reason.
logged() {
    local log=$1 reason=$2; shift 2
    "$@" >"$log" 2>&1 || fail_with_log "$log" "$reason"
}
# True when OUT exists and is newer than every input (files, or dirs searched).
up_to_date() {
    local out=$1; shift
    [[ -f $out ]] || return 1
    [[ -z $(find "$@" -newer "$out" -print -quit 2>/dev/null) ]]
}
note() { echo "build-polyglot: $*"; }

[[ $# -eq 1 ]] || die "usage: scripts/build-polyglot.sh OUTDIR"
mkdir -p "$1" "$LOGS" || die "cannot create $1 or $LOGS"
OUT=$(cd "$1" && pwd)

# One run at a time: concurrent runs would share target/polyglot.
exec 9>"$TOOLS/.lock"
flock 9

# ---------------------------------------------------------------- toolchains

ensure_python() {
    local venv=$TOOLS/venv
    if [[ $("$venv/bin/componentize-py" --version 2>/dev/null) == "componentize-py $COMPONENTIZE_PY_VERSION" ]]; then
        return
    fi
    note "Python: installing componentize-py $COMPONENTIZE_PY_VERSION into $venv"
    command -v python3 >/dev/null || die "Python: python3 not found, cannot install componentize-py"
    logged "$LOGS/python-venv.log" "Python: cannot create a venv with python3 -m venv (Debian: apt-get install python3-venv)" \
        python3 -m venv --clear "$venv"
    logged "$LOGS/componentize-py.log" "Python: cannot install componentize-py $COMPONENTIZE_PY_VERSION from PyPI with pip" \
        "$venv/bin/pip" install --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
}

ensure_js() {
    local src=$ROOT/guest-plugins/js node=$TOOLS/node
    local stamp=$node/.installed-lock
    if [[ -x $node/node_modules/.bin/componentize-qjs ]] && cmp -s "$src/package-lock.json" "$stamp"; then
        return
    fi
    note "JavaScript: installing componentize-qjs (npm ci) into $node"
    command -v npm >/dev/null || die "JavaScript: npm not found, cannot install componentize-qjs"
    mkdir -p "$node"
    cp "$src/package.json" "$src/package-lock.json" "$src/.npmrc" "$node/"
    rm -f "$stamp"
    # No install scripts: none of these packages needs one, and any download
    # a script might try would fail here anyway.
    logged "$LOGS/npm-ci.log" "JavaScript: cannot install componentize-qjs from npm with npm ci" \
        npm ci --prefix "$node" --ignore-scripts --no-audit --no-fund
    cp "$src/package-lock.json" "$stamp"
}

apt_missing() { # prints the missing packages on one line
    local p missing=()
    for p in "${APT_PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
    done
    echo "${missing[*]}"
}

cargo_tool() { # NAME CRATE VERSION: installs CRATE@VERSION unless NAME --version says so
    local name=$1 crate=$2 version=$3
    if [[ $("$TOOLS/cargo-bin/bin/$name" --version 2>/dev/null) == *" $version"* ]]; then
        return
    fi
    note "C: installing $crate $version with cargo install (a few minutes)"
    command -v cargo >/dev/null || die "C: cargo not found, cannot install $crate"
    logged "$LOGS/$crate.log" "C: cannot install $crate $version with cargo install" \
        cargo install "$crate@$version" --locked --root "$TOOLS/cargo-bin"
}

# The wasi_snapshot_preview1 reactor adapter turns the wasm32-wasi core
# module into a component; it comes from the wasi-preview1-component-adapter-
# provider crate, written out by a throwaway program that prints its bytes.
ensure_adapter() {
    local dir=$TOOLS/adapter-$ADAPTER_VERSION
    ADAPTER=$dir/wasi_snapshot_preview1.reactor.wasm
    [[ -s $ADAPTER ]] && return
    note "C: extracting the WASI preview 1 reactor adapter $ADAPTER_VERSION (a cargo package)"
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
    std::io::stdout().write_all(bytes).unwrap();
}
EOF
    (cd "$dir" && cargo run --quiet --release --target-dir "$dir/target" >"$ADAPTER.tmp" 2>"$LOGS/adapter.log") \
        || fail_with_log "$LOGS/adapter.log" "C: cannot get wasi-preview1-component-adapter-provider $ADAPTER_VERSION with cargo"
    mv "$ADAPTER.tmp" "$ADAPTER"
}

ensure_c() {
    local missing
    missing=$(apt_missing)
    if [[ -n $missing ]]; then
        note "C: installing Debian packages: $missing"
        [[ $(id -u) -eq 0 ]] || die "C: Debian packages missing ($missing) and not root to apt-get install them"
        logged "$LOGS/apt-update.log" "C: apt-get update failed, cannot install $missing" apt-get update
        # shellcheck disable=SC2086
        logged "$LOGS/apt-install.log" "C: cannot install Debian packages $missing with apt-get" \
            env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
    fi
    cargo_tool wasm-tools wasm-tools "$WASM_TOOLS_VERSION"
    cargo_tool wit-bindgen wit-bindgen-cli "$WIT_BINDGEN_VERSION"
    ensure_adapter
}

# Runs an install step and tells how long it took when it did some work.
timed() { # LABEL COMMAND...
    local label=$1 start=$SECONDS; shift
    "$@"
    (( SECONDS - start < 2 )) || note "$label toolchain installed in $((SECONDS - start))s"
}

timed Python ensure_python
timed JavaScript ensure_js
timed C ensure_c

# ------------------------------------------------------------------- builds

# Each plugin is built from a copy of its module alone, so that a component
# carries only its own code and componentize-py leaves no __pycache__ behind.
build_python() { # PLUGIN [WORLD]
    local src=$ROOT/guest-plugins/python out=$OUT/$1-python.wasm stage=$TOOLS/build/python/$1
    local world=${2:-plugin}
    up_to_date "$out" "$src/$1.py" "$WIT" "$SELF" "$TOOLS/venv/bin/componentize-py" && return
    note "Python: building $out"
    rm -rf "$stage" && mkdir -p "$stage" && cp "$src/$1.py" "$stage/"
    logged "$LOGS/build-$1-python.log" "Python: componentize-py failed to build $1" \
        "$TOOLS/venv/bin/componentize-py" -d "$WIT" -w "$world" componentize -p "$stage" "$1" -o "$out.tmp"
    mv "$out.tmp" "$out"
}

build_js() { # PLUGIN
    local src=$ROOT/guest-plugins/js out=$OUT/$1-js.wasm
    up_to_date "$out" "$src/$1.js" "$WIT" "$SELF" "$TOOLS/node/.installed-lock" && return
    note "JavaScript: building $out"
    # QuickJS (componentize-qjs), not StarlingMonkey (componentize-js): every
    # componentize-js export call leaves a few hundred bytes of garbage that
    # only a major collection frees, and SpiderMonkey's default thresholds
    # let linear memory reach about 75 MiB before it levels off, past the host's
    # 64 MiB cap (BENCHMARKS.md, issue 15). QuickJS counts references and
    # frees as it goes. --sync: the host calls plugins without the
    # component-model async ABI.
    logged "$LOGS/build-$1-js.log" "JavaScript: componentize-qjs failed to build $1" \
        "$TOOLS/node/node_modules/.bin/componentize-qjs" --wit "$WIT" --world plugin \
        --js "$src/$1.js" --sync -o "$out.tmp"
    mv "$out.tmp" "$out"
}

# C bindings are generated into guest-plugins/c/bindings (ignored by git).
build_c() { # PLUGIN
    local src=$ROOT/guest-plugins/c out=$OUT/$1-c.wasm
    local bindings=$src/bindings obj=$TOOLS/build/c
    local bin=$TOOLS/cargo-bin/bin
    up_to_date "$out" "$src/$1.c" "$WIT" "$SELF" "$bin/wit-bindgen" "$bin/wasm-tools" "$ADAPTER" && return
    note "C: building $out"
    mkdir -p "$obj"
    if ! up_to_date "$bindings/plugin.c" "$WIT" "$bin/wit-bindgen"; then
        rm -rf "$bindings"
        logged "$LOGS/wit-bindgen-c.log" "C: wit-bindgen failed to generate the C bindings" \
            "$bin/wit-bindgen" c "$WIT" --world plugin --out-dir "$bindings"
    fi
    # wasm32-wasi (preview 1) is what Debian's wasi-libc supports; a reactor
    # has no main. The adapter then maps its WASI calls onto WASI 0.2.
    logged "$LOGS/build-$1-c.log" "C: clang failed to build $1" \
        clang --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor -O2 -Wall -Wextra -Wl,--strip-debug \
        -I "$bindings" -o "$obj/$1.core.wasm" \
        "$src/$1.c" "$bindings/plugin.c" "$bindings/plugin_component_type.o"
    logged "$LOGS/component-$1-c.log" "C: wasm-tools component new failed for $1" \
        "$bin/wasm-tools" component new "$obj/$1.core.wasm" \
        --adapt "wasi_snapshot_preview1=$ADAPTER" -o "$out.tmp"
    mv "$out.tmp" "$out"
}

for plugin in "${PLUGINS[@]}"; do build_python "$plugin"; done
# Hands its counts over to the next version (and takes the Rust counter's).
build_python counter stateful-plugin
for plugin in "${PLUGINS[@]}"; do build_js "$plugin"; done
for plugin in "${PLUGINS[@]}"; do build_c "$plugin"; done

# One KEY=VALUE a line, usable with `. OUTDIR/toolchains.env`.
cat >"$OUT/toolchains.env" <<EOF
# Written by scripts/build-polyglot.sh: where its toolchains are.
TOOLCHAIN_PATH=$TOOLS/venv/bin:$TOOLS/node/node_modules/.bin:$TOOLS/cargo-bin/bin
WASI_ADAPTER=$ADAPTER
EOF

note "components in $OUT:"
for lang in python js c; do
    for plugin in "${PLUGINS[@]}"; do
        f=$OUT/$plugin-$lang.wasm
        [[ -s $f ]] || die "$lang: $f was not built"
        printf '  %-18s %9d bytes\n' "$plugin-$lang.wasm" "$(stat -c %s "$f")"
    done
done
[[ -s $OUT/counter-python.wasm ]] || die "python: $OUT/counter-python.wasm was not built"
