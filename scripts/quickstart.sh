#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the quickstart on the offline tiny world:
# build (or reuse) the warm-started tiny model, train GRPO on CPU, report accuracy before and after,
# and draw the entropy and reward curves to runs/quickstart/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
OUT=runs/quickstart
rm -rf "$OUT"
start=$(date +%s)
rlvr-entropy evaluate tiny --temperature 1.0 0
rlvr-entropy train recipes/tiny/grpo.yaml output_dir="$OUT/grpo"
rlvr-entropy evaluate "$OUT/grpo" --temperature 1.0 0
rlvr-entropy plot "$OUT/grpo" -o "$OUT/curves.png"
echo "quickstart finished in $(( $(date +%s) - start ))s: metrics in $OUT/grpo/metrics.jsonl, curves in $OUT/curves.png"
