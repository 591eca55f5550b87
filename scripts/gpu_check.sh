#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with an NVIDIA GPU and the project installed:
#   1. the tests marked `gpu` (the "attention (GPU)" launch config stopping inside attention over
#      the Debug Adapter Protocol, CUDA loading matching Hugging Face, `demo --device cuda`, ...),
#   2. the benchmarks on CUDA (forward and KV-cache generation vs Hugging Face, hooks, traces vs
#      torchinfo and TorchLens, NaN watch, describe vs lovely-tensors; the peers that are not
#      installed give a "failed" row), written to OUT/bench/results.md,
#   3. the whole suite, where every CPU test also runs beside a visible GPU.
# Each step has its own time limit, so one hang cannot eat the others.
#
#     bash scripts/gpu_check.sh [OUT]        # OUT defaults to ./gpu-check
set -uo pipefail
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                  torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

status=0
echo "== 1. tests marked gpu"
timeout 150 python3 -m pytest -q -m gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
status=$((status | PIPESTATUS[0]))

echo "== 2. benchmarks on CUDA"
timeout 170 python3 benchmarks/run.py --device cuda \
  --groups forward,generate,module_trace,op_trace,nan_watch,describe \
  --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
status=$((status | PIPESTATUS[0]))

echo "== 3. the whole suite beside a GPU"
timeout 150 python3 -m pytest -q -n "${WORKERS:-12}" -rs -p no:cacheprovider 2>&1 \
  | tee "$OUT/suite.log" | tail -40
status=$((status | PIPESTATUS[0]))
exit "$status"
