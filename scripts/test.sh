#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the whole test suite (slow tests included), then
# the vLLM tests in their own environment (.venv-vllm, CPU build of vLLM; RLVR_VLLM_TESTS=0 skips them).
# Extra arguments go to the main pytest run, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
(
  # shellcheck source=scripts/setup_env.sh
  . scripts/setup_env.sh
  python -m pytest "$@"
)
if [ "${RLVR_VLLM_TESTS:-1}" != "0" ]; then
  bash scripts/test_vllm.sh -q -ra
fi
