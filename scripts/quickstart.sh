#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the quickstart on the offline tiny world:
# build (or reuse) the warm-started tiny model, train plain GRPO, Clip-Cov and KL-Cov on CPU with the
# same seed, report held-out accuracy before and after, and draw the entropy and reward curves of the
# three runs on one figure: runs/quickstart/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
OUT=runs/quickstart
rm -rf "$OUT"
start=$(date +%s)
rlvr-entropy evaluate tiny --temperature 1.0 0
for method in grpo clip_cov kl_cov; do
  rlvr-entropy train "recipes/tiny/$method.yaml" output_dir="$OUT/$method"
  rlvr-entropy evaluate "$OUT/$method" --temperature 1.0 0
done
rlvr-entropy plot "$OUT/grpo" "$OUT/clip_cov" "$OUT/kl_cov" -o "$OUT/curves.png"
echo "quickstart finished in $(( $(date +%s) - start ))s: metrics in $OUT/*/metrics.jsonl, curves in $OUT/curves.png"
