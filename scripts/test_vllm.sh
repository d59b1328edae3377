#!/usr/bin/env bash
# Build (or reuse) .venv-vllm, the CPU vLLM environment (scripts/setup_vllm_cpu.sh), and run the tests
# marked `vllm` there: real vLLM generation and two-step GRPO runs on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_vllm_cpu.sh
. scripts/setup_vllm_cpu.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# In-process vLLM engine (no EngineCore process) and a 1 GiB KV cache instead of half the RAM.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
"${RLVR_VLLM_VENV:-.venv-vllm}/bin/python" -m pytest -m vllm tests/test_vllm.py tests/methods/test_typical.py "$@"
