#!/usr/bin/env bash
# Set up ./.venv if needed, then run the web app (extra arguments go to app.py, e.g. --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
