#!/usr/bin/env bash
# Create ./.venv once and install the pinned requirements and this project (editable) into it;
# re-install only when requirements*.txt or pyproject.toml change. Used by scripts/test.sh and
# scripts/app.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned: an unpinned torch would pull multi-GB CUDA wheels on CPU machines
  .venv/bin/python -m pip install --quiet "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  # this project itself, editable: the `leffa` command, usable from any folder
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
