#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test wasm-echo: the
# wasm32-wasip2 Rust target, which the guest plugins are compiled for; the
# Debian packages the tests run; kubernetes-validate in target/venv. Safe to
# run again: it does nothing when everything is there.
set -euo pipefail

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
    echo "bootstrap: installing the $target Rust target" >&2
    rustup target add "$target"
fi

# The real services the tests start on loopback (nginx, prometheus, ...).
"$(dirname "$0")/install-debian.sh"

# kubernetes-validate (PyPI), which tests/e2e/kubernetes.rs runs, in a venv
# of the project's own rather than system-wide. It ships the Kubernetes
# schemas, so validating needs no network.
KUBERNETES_VALIDATE_VERSION=1.37.0
venv=$(cd "$(dirname "$0")/.." && pwd)/target/venv
if [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) != "$KUBERNETES_VALIDATE_VERSION" ]]; then
    echo "bootstrap: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv" >&2
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
