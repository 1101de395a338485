#!/usr/bin/env bash
# Set up (if needed), then run the quickstart pipeline; extra arguments go to `cliplab quickstart`
# and are read from the folder this script was called from (a relative --out lands there).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$repo" && bash scripts/setup.sh quickstart)
exec "$repo/.venv/bin/cliplab" quickstart "$@"
