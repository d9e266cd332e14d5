#!/usr/bin/env bash
# The GPU check, in one command, for a session that has an NVIDIA GPU machine (no network there).
#
# Here, once:   bash sidecar/bench/gpu/fetch_gpu_wheels.sh      (the packages that machine lacks, into .whl/)
# There:        device run, command "bash sidecar/bench/gpu/gpu_check.sh", carry [".whl"], timeout_s 540
#
# It installs the carried wheels into /tmp/site, runs the GPU tests (tests/test_gpu.py and the kernel tests), then
# `npc bench --scenario multi-npc --device cuda` on a random-weight Llama-3.2-1B-shaped model with
# 8, 32 and 128 adapters against transformers + PEFT. Everything lands in $OUT (what the device
# tool brings back, at most 8 files): env.txt, pytest.log, bench.log and gpu.{json,md,png}; copy
# the last three into docs/bench/. The whole script stays inside GPU_CHECK_BUDGET seconds (default
# 450): pytest gets at most PYTEST_BUDGET (120), the bench the rest, each bench run at most
# RUN_TIMEOUT (240), and the bench rewrites its report after every run, so a cut leaves figures.
# GPU_CHECK_TOKENS (32) new tokens per NPC; GPU_CHECK_NS (8,32,128) the NPC counts; PYTEST_BUDGET=0
# skips the tests (a rerun of the bench alone: GPU_CHECK_BUDGET=300 PYTEST_BUDGET=0 bash sidecar/bench/gpu/gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/../../.." || exit 2

start=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-450}
PYTEST_BUDGET=${PYTEST_BUDGET:-120}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
TOKENS=${GPU_CHECK_TOKENS:-32}
NS=${GPU_CHECK_NS:-8,32,128}
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
say() { echo "[gpu_check +$((SECONDS - start))s] $*"; }

# 1. The packages the machine lacks (gguf, structlog, grpcio-*, protobuf, prompt-toolkit, pexpect).
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in .whl/. Run 'bash sidecar/bench/gpu/fetch_gpu_wheels.sh' in the repository first, and" \
       "pass carry [\".whl\"] to the device run (.whl/ is git-ignored, so it travels only when carried)." >&2
  exit 3
fi
say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: installing the wheels failed" >&2; exit 4; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. What the figures ran on.
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not found or failed"
  "$PY" - <<'PYEOF' 2>&1
import sys

import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch")
PYEOF
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|tokenizers|safetensors|numpy|gguf|protobuf|grpcio) '
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. The GPU tests (they write their own models), and the kernel / decode-step tests, which run in
# Triton's interpreter on a CPU and compiled here. A module that cannot be imported does not stop the others.
TESTS=(tests/test_gpu.py tests/test_triton_kernels.py tests/test_cuda_path.py)
status=0
if [ "$PYTEST_BUDGET" -le 0 ]; then
  say "PYTEST_BUDGET=0: gpu tests skipped"
else
  timeout_flag=()
  "$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout 100)
  say "pytest ${TESTS[*]} (at most ${PYTEST_BUDGET}s)"
  timeout -k 10 "$PYTEST_BUDGET" "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --continue-on-collection-errors \
    ${timeout_flag[@]+"${timeout_flag[@]}"} 2>&1 | tee "$OUT/pytest.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) say "gpu tests passed" ;;
    124|137) say "gpu tests stopped at ${PYTEST_BUDGET}s"; status=1 ;;
    *) say "gpu tests failed (pytest exit $rc)"; status=1 ;;
  esac
fi

# 4. The benchmark, in what is left of the budget (minus a margin for its report and exit).
left=$((BUDGET - (SECONDS - start)))
if [ "$left" -lt 90 ]; then
  say "only ${left}s left of ${BUDGET}s: no time for the bench"
  exit 1
fi
say "npc bench --scenario multi-npc --device cuda (time budget $((left - 30))s)"
timeout -k 10 $((left - 10)) "$PY" -m sidecar bench --scenario multi-npc --device cuda --model-shape llama-3.2-1b \
  --n "$NS" --tokens "$TOKENS" --peers hf-peft --run-timeout "$RUN_TIMEOUT" --time-budget $((left - 30)) \
  --workdir /tmp/npc-bench-multi --out "$OUT" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  say "the bench failed (exit $rc)"
  status=1
elif grep -q "Did not finish" "$OUT/gpu.md" 2>/dev/null; then
  say "the bench ran, but some runs did not finish (see gpu.md)"
  status=1
fi
say "done (exit $status); in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
