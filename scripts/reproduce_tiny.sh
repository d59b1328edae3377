#!/usr/bin/env bash
# Set up the virtual environment if needed, then run the tiny benchmark (scripts/reproduce_tiny.py): the
# baselines, every method and one composition over three seeds with one budget, two runs at a time, and
# write docs/tiny-benchmark.md with the table, the figures and each claim's verdict (51 minutes on 2 cores).
#   bash scripts/reproduce_tiny.sh            # 3 seeds x 200 steps
#   bash scripts/reproduce_tiny.sh --quick    # 1 seed x 60 steps, report in runs/tiny_benchmark_quick/ (7.5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
exec python scripts/reproduce_tiny.py "$@"
