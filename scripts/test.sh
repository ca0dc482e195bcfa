#!/usr/bin/env bash
# Set up ./.venv if needed, then run the whole test suite (extra arguments go to pytest).
# The browser test drives Debian's Chromium; it is installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "[setup] installing Debian's chromium for the browser test" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False  # tests never reach the network
exec .venv/bin/python -m pytest "$@"
