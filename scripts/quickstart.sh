#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the quickstart on the offline tiny world:
# build (or reuse) the warm-started tiny model, train plain GRPO, Clip-Cov and KL-Cov on CPU with the
# same seed on the `split` task, where GRPO's entropy collapses (recipes/tiny/{grpo,clip_cov,kl_cov}_split.yaml,
# each evaluating itself every 100 steps), report held-out pass@1 / pass@8 / maj@8 and entropy before and
# after, draw the entropy, reward, evaluation and method curves of the three runs on one figure
# (runs/quickstart/curves.png; one panel shows each run's rollout entropy per prompt-difficulty bucket,
# unsolved to solved, over its first and its last tenth of rollouts), print the compare table with one
# line per method against GRPO and the pass@1-vs-pass@8 table, and fit the entropy-performance law and
# the covariance diagnostic (entropy_law.png, covariance.png, tradeoff.png). Three seeds of every method:
# scripts/reproduce_tiny.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
OUT=runs/quickstart
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
# Held-out prompts at the training temperature; builds and caches the tiny model on first use.
EVAL=(--data task:split --k 8 --temperature 1.0 --num-prompts 256 --no-progress)
echo "[quickstart] before training:"
rlvr-entropy evaluate tiny "${EVAL[@]}"
# Two runs at a time, one per core (each single-threaded); their logs go to $OUT/<method>.log.
train() {  # train <run name>: recipes/tiny/<name>_split.yaml into $OUT/<name>
  echo "[quickstart] training $1 (log: $OUT/$1.log)"
  rlvr-entropy train "recipes/tiny/$1_split.yaml" output_dir="$OUT/$1" > "$OUT/$1.log" 2>&1
}
finish() {  # wait for a run; on failure show why and stop
  if ! wait "$1"; then echo "[quickstart] $2 failed:"; tail -n 30 "$OUT/$2.log"; exit 1; fi
}
RUNS=("$OUT/grpo" "$OUT/clip_cov" "$OUT/kl_cov")
# One line every 20 s while the runs train: step, accuracy, entropy, latest evaluation of each.
rlvr-entropy watch "${RUNS[@]}" --interval 20 & watcher=$!
trap 'kill "$watcher" 2>/dev/null || true' EXIT
train grpo & grpo=$!
train clip_cov & clip_cov=$!
finish "$grpo" grpo
train kl_cov & kl_cov=$!
finish "$clip_cov" clip_cov
finish "$kl_cov" kl_cov
kill "$watcher" 2>/dev/null || true
echo "[quickstart] before (tiny) and after training:"
rlvr-entropy evaluate tiny "${RUNS[@]}" "${EVAL[@]}" --json "$OUT/evaluation.json"
rlvr-entropy plot "${RUNS[@]}" -o "$OUT/curves.png"
rlvr-entropy compare "${RUNS[@]}" --baseline grpo   # the table, then one line per method against GRPO
# The law fit refuses a run whose entropy hardly moved (exit 2, reason printed): not a failed quickstart.
rlvr-entropy fit-law "${RUNS[@]}" -o "$OUT/entropy_law.png" || echo "[quickstart] the law was not fitted to every run (see above)"
rlvr-entropy covariance "${RUNS[@]}" -o "$OUT/covariance.png"
rlvr-entropy tradeoff "${RUNS[@]}" -o "$OUT/tradeoff.png"
echo "quickstart finished in $(( $(date +%s) - start ))s: metrics in $OUT/*/metrics.jsonl, figures in $OUT/{curves,entropy_law,covariance,tradeoff}.png"
