#!/usr/bin/env bash
# One pass on a fresh GPU machine (torch, triton, transformers, peft, pybind11, cmake, ninja; no
# internet): build slimtune._C for the local card, run the GPU tests, the kernel microbenchmarks
# and the end-to-end step benchmark, and print the step table last. Run from the repository root.
# Results land in benchmarks/results/ (and are copied to $OUT when the device runner sets it).
# Budget: about 6 minutes on an H100/H200 (tests and microbenchmarks are time-boxed). Knobs: METHODS, BATCH, SEQ, SKIP_TESTS=1, SKIP_KERNELS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log
exec > >(tee "$LOG") 2>&1

step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

step "card and versions"
nvidia-smi --query-gpu=name,compute_cap,clocks.sm,memory.total --format=csv,noheader || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step "build slimtune._C for this card"
if [ -z "${SLIMTUNE_CUDA_ARCHS:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  export SLIMTUNE_CUDA_ARCHS=${cap:-90}
fi
export SLIMTUNE_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
$PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5
$PY -m slimtune info

have() { $PY -c "import $1" 2>/dev/null; }

step "end-to-end step benchmark (first: the numbers matter most)"
$PY -m slimtune bench --model tinyllama-1.1b --batch "${BATCH:-8}" --seq "${SEQ:-2048}" \
  --methods "${METHODS:-floor,paca,paca-partial-adamw,s2ft,lora,hydra,peft-lora,peft-lora-bf16,full}" \
  --out "$RESULTS"


if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "GPU tests (bf16/fp16/fp32 on CUDA: Triton, CUDA C++ and torch paths)"
  if have pytest; then
    timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25 \
      || echo "GPU TESTS FAILED OR TIMED OUT"
  else
    echo "pytest is not installed here: GPU tests NOT run"
  fi
fi

if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  step "kernel microbenchmarks"
  if have pytest_benchmark; then
    card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
    timeout "${KERNEL_TIMEOUT:-90}" $PY -m pytest -q benchmarks/bench_kernels.py benchmarks/bench_lora.py -p no:cacheprovider \
      --benchmark-max-time=0.2 --benchmark-json "$RESULTS/kernels-$card.json" 2>&1 | tail -60 \
      || echo "KERNEL BENCHMARKS FAILED OR TIMED OUT"
  else
    echo "pytest-benchmark is not installed here: kernel microbenchmarks NOT run"
  fi
fi

if [ -n "${OUT:-}" ]; then
  cp -r "$RESULTS"/. "$OUT"/
fi
step "done"
latest=$(ls -t "$RESULTS"/bench-*.md | head -1)
cat "$latest"
