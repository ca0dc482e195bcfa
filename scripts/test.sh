#!/usr/bin/env bash
# Set up ./.venv if needed, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1  # tests never reach the network
exec .venv/bin/python -m pytest "$@"
