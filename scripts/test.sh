#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
python -m pytest "$@"
