#!/usr/bin/env bash
# Builds wasm-echo's container image without a daemon (no Docker, no
# Podman service), with Debian's umoci:
#
#   deploy/image.sh [OUTDIR]          # OUTDIR defaults to target/image
#
# OUTDIR is then an OCI image layout holding one image, tagged with the
# workspace's version (`OUTDIR:0.1.0` to umoci and skopeo, `oci:OUTDIR:0.1.0`
# to skopeo copy and podman). Its only file is /wasm-echo, a statically
# linked binary: no libc, no shell, no /tmp (deploy/kubernetes/deployment.yaml
# mounts what the server writes). It runs as user 65532, with /wasm-echo as
# the entrypoint and `serve` as the default command.
#
# The binary is static glibc (`-C target-feature=+crt-static` on the host's
# gnu target): the musl target would need rustup's own download server,
# which this project's machines cannot reach. It is built into
# target/<host triple>/release/, beside the ordinary build and compiled once
# more from scratch the first time (wasmtime included: minutes), then
# incrementally. The script fails, saying why, unless the binary is static
# and runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/image}

die() { echo "image: $*" >&2; exit 1; }
command -v umoci >/dev/null || die "umoci not found (Debian: apt-get install umoci; scripts/bootstrap.sh installs it)"
command -v file >/dev/null || die "file not found (Debian: apt-get install file)"
command -v strip >/dev/null || die "strip not found (Debian: apt-get install binutils)"

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n 1)
[[ -n $VERSION ]] || die "no version in $ROOT/Cargo.toml"
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
[[ $TRIPLE == *-linux-gnu ]] || die "a static glibc build needs a *-linux-gnu host, not $TRIPLE"

# An explicit --target keeps the static flag off build scripts and
# procedural macros, which must stay ordinary host programs, and off the
# guest plugins (host/build.rs builds them for wasm32 with flags of its own).
echo "image: building a static wasm-echo for $TRIPLE" >&2
flags_var=CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$TRIPLE")_RUSTFLAGS
env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_TARGET \
    "$flags_var=-C target-feature=+crt-static" \
    cargo build --release --locked --quiet --manifest-path "$ROOT/Cargo.toml" \
    --target "$TRIPLE" --target-dir "$ROOT/target" --bin wasm-echo
BIN=$ROOT/target/$TRIPLE/release/wasm-echo

# Static, or the image would hold a binary that cannot start: `file` says
# "statically linked" (or "static-pie linked"), and ldd finds no library.
kind=$(file -b "$BIN")
[[ $kind == *"static-pie linked"* || $kind == *"statically linked"* ]] \
    || die "$BIN is not statically linked: $kind"
if ldd "$BIN" 2>&1 | grep -q '=>'; then
    die "$BIN loads shared libraries: $(ldd "$BIN" 2>&1 | tr '\n' ' ')"
fi
"$BIN" --version >/dev/null || die "$BIN does not run"

# Built aside, then moved into place: an interrupted run leaves the old
# image whole.
work=$(mktemp -d "${TMPDIR:-/tmp}/wasm-echo-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The release profile keeps line tables for backtraces (a quarter of the
# binary's size); the image goes without them.
strip --strip-debug -o "$work/wasm-echo" "$BIN"
layout=$work/layout
image=$layout:$VERSION
umoci init --layout "$layout"
umoci new --image "$image"
umoci insert --rootless --image "$image" --history.created_by "deploy/image.sh" "$work/wasm-echo" /wasm-echo
umoci config --image "$image" \
    --config.entrypoint /wasm-echo --config.cmd serve \
    --config.user 65532:65532 \
    --config.exposedports 12345/udp --config.exposedports 12345/tcp \
    --config.label org.opencontainers.image.title=wasm-echo \
    --config.label "org.opencontainers.image.version=$VERSION" \
    --config.label org.opencontainers.image.licenses=Apache-2.0 \
    --history.created_by "deploy/image.sh"
umoci gc --layout "$layout"

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$layout" "$OUT"
echo "image: $OUT:$VERSION ($(du -sh "$OUT" | cut -f1)): /wasm-echo, $(file -b "$work/wasm-echo")" >&2
