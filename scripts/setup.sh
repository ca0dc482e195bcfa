#!/usr/bin/env bash
# Create ./.venv once and install the pinned requirements and this project (editable) into it;
# re-install only when requirements*.txt or pyproject.toml change. Used by scripts/test.sh and
# scripts/app.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
say() { echo "[setup] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  start=$SECONDS
  say "upgrading pip"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned: an unpinned torch would pull multi-GB CUDA wheels on CPU machines
  torch_pin=$(grep -E '^torch==' requirements.txt)
  say "installing $torch_pin (the largest download; a few minutes on a first run)"
  .venv/bin/python -m pip install --quiet "$torch_pin"
  say "installing the pinned requirements (requirements.txt, requirements-dev.txt)"
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  # this project itself, editable: the `leffa` command, usable from any folder
  say "installing this project (editable): the leffa command"
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps -e .  # no setuptools notice about editable installs
  echo "$want" > "$stamp"
  say "done in $((SECONDS - start)) s"
else
  say ".venv is up to date"
fi
