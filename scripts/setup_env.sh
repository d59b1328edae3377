#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package into it.
# Sourced by quickstart.sh and test.sh. Installs torch 2.13.0 first: on this machine kind pip takes
# it from local disk, and installing it first keeps any other requirement from pulling a CUDA build.
set -euo pipefail
VENV="${RLVR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.rlvr-entropy-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 and rlvr-entropy (a minute or two the first time)"
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
