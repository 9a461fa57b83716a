#!/usr/bin/env bash
# Installs the benchmark extra into .venv (first run only) and runs the whole suite:
# results, table and plot in bench/results/<UTC time>/. Extra flags go to bench/run.py (--quick).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -c "import embedwarden.server, matplotlib, skimage" 2>/dev/null || {
    python -m pip install -q --upgrade pip
    python -m pip install -q -e '.[bench]'
}
exec python bench/run.py "$@"
