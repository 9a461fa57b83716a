#!/usr/bin/env bash
# Installs the server into .venv (first run only) and starts it on the built-in default model
# (efficientnet_lite0@1) on 127.0.0.1:50051, metrics on 127.0.0.1:9464. Extra flags go to
# `embedwarden serve`, e.g. scripts/serve.sh --port 50052 --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# Reinstalls when the package or its console script is missing or stale (e.g. an entry point
# that moved since the last install).
{ python -c "import embedwarden.server" && embedwarden --help; } >/dev/null 2>&1 || {
    python -m pip install -q --upgrade pip
    python -m pip install -q -e '.[server]'
}
exec embedwarden serve "$@"
