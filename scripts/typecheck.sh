#!/usr/bin/env bash
# mypy over the packages under their import names (embedwarden.server, .client, .ray).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/typing/embedwarden
ln -sfn ../../../server build/typing/embedwarden/server
ln -sfn ../../../client build/typing/embedwarden/client
ln -sfn ../../../bulk build/typing/embedwarden/ray
ln -sfn ../../../proto/embedwarden/v1 build/typing/embedwarden/v1
exec mypy "$@"
