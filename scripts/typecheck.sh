#!/usr/bin/env bash
# mypy over the packages under their import names (embedwarden.server, .client, .ray).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_import_links.sh
exec mypy "$@"
