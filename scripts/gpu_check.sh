#!/usr/bin/env bash
# GPU check (scripts/gpu_check.py): step time of TRL's GRPOTrainer against EntropyGRPOTrainer with no method and
# with each method, tokens/s, peak GPU memory, and with vLLM the cost of top-20 log-probs and the entropy gap.
# One GPU, about 6-8 minutes, nothing downloaded (a 0.5B Qwen2 built from a config). Writes runs/gpu_check/.
#   bash scripts/gpu_check.sh                  # in the current Python environment (rlvr-entropy installed)
#   bash scripts/gpu_check.sh --cpu --tiny     # the same code path on a CPU, under 2 minutes (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
exec python scripts/gpu_check.py "$@"
