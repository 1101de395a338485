#!/usr/bin/env bash
# Set up (if needed), then run the quickstart pipeline; extra arguments go to `cliplab quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cliplab quickstart "$@"
