#!/usr/bin/env bash
# One pass on a fresh GPU machine (torch, triton, transformers, peft, pybind11, cmake, ninja; no
# internet), in at most BUDGET seconds (default 480): every phase is time-boxed and saves its own
# files into benchmarks/results/gpu-check-<stamp>/ the moment it ends, copied at once to $OUT when
# the device runner sets it, so a run cut short keeps everything finished before the cut.
#
# Phases, most valuable first: versions; build slimtune._C for the local card (no nvcc: the CUDA
# C++ kernels are skipped and said; a failed build falls back to the pure-Python package); the
# end-to-end step benchmark (anchors' protocol, every method); `slimtune profile --device cuda`
# (accounted beside measured memory and time); the backend decision benchmarks (fused Triton LoRA
# GEMM against cuBLAS, PaCA's column gradient through Triton against cuBLAS) and which backend each
# op should prefer; a GPU test subset (the remainder is counted and said); the other kernel
# microbenchmarks at the TinyLlama shapes. Knobs: BUDGET, METHODS, BATCH, SEQ.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # on a CPU: the same phases and time boxes, tiny work
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-480}
export PY DRY
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=gpu-check-$STAMP
RESULTS=benchmarks/results/$RUN
[ "$DRY" = 1 ] && RESULTS=${DRY_RESULTS:-$(mktemp -d)}/$RUN
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
printf 'phase\trc\tseconds\tlimit\n' > "$RESULTS/phases.tsv"
[ "$DRY" = 1 ] && echo "DRY RUN on $(uname -m): structure and time boxes only; no number here is a GPU result" \
  | tee "$RESULTS/DRY_RUN"

save() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$RUN" && cp -r "$RESULTS"/. "$OUT/$RUN"/
  fi
}

# phase NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the budget is nearly spent),
# log it to NAME.log, record rc and time in phases.tsv, save.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - 5))
  [ "$DRY" = 1 ] && [ "$limit" -gt 120 ] && limit=120
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: SKIPPED, the ${BUDGET}s budget is spent"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$RESULTS/phases.tsv"
    save
    return 0
  fi
  echo "=== $name (time box ${limit}s, at ${SECONDS}s)"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    set -- bash -c "$(declare -f "$1"); $1"
  fi
  local start=$SECONDS rc
  timeout -k 5 "$limit" "$@" > >(tee "$RESULTS/$name.log") 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "--- $name hit its ${limit}s time box; what it wrote so far is kept"
  echo "--- $name: rc=$rc in $((SECONDS - start))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$RESULTS/phases.tsv"
  save
  return 0
}

versions() {
  nvidia-smi --query-gpu=name,compute_cap,clocks.sm,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found (CUDA C++ kernels will be skipped)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable (Triton kernels skipped)"
  $PY -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"
}

build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run pip install --no-build-isolation --no-deps -e . (with the card's arch)"
    return 0
  fi
  if command -v nvcc >/dev/null; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    export SLIMTUNE_WITH_CUDA=1 SLIMTUNE_CUDA_ARCHS=${SLIMTUNE_CUDA_ARCHS:-${cap:-90}}
  else
    echo "no nvcc: building the C++ CPU kernels only; the CUDA C++ backend is skipped"
    export SLIMTUNE_WITH_CUDA=0
  fi
  export MAX_JOBS=${MAX_JOBS:-16}
  $PY -m pip install --no-build-isolation --no-deps -q -e . \
    || { echo "BUILD FAILED: installing without the extension (torch and Triton paths only)";
         SLIMTUNE_BUILD_EXT=0 $PY -m pip install --no-build-isolation --no-deps -q -e .; }
  $PY -m slimtune info
}

if [ "$DRY" = 1 ]; then
  BENCH=(--model tiny --device cpu --warmup 0 --steps 1 --methods "${METHODS:-floor,paca,lora,peft-lora,full}")
  PROFILE=(--model tiny --batch 2 --seq 32 --device meta --methods floor,floor+lean,paca+lean,lora,full)
  MICRO=(--benchmark-max-time=0.01 --benchmark-min-rounds=1)
  SHAPES="up or down"
  TESTS=(--collect-only -q)
else
  BENCH=(--model tinyllama-1.1b --batch "${BATCH:-8}" --seq "${SEQ:-2048}" \
    --methods "${METHODS:-floor,paca,paca-partial-adamw,s2ft,lora,hydra,peft-lora,peft-lora-bf16,full}")
  # Lean against non-lean and against Liger-Kernel (its row errors cleanly where it is not installed).
  PROFILE=(--batch "${BATCH:-8}" --seq "${SEQ:-2048}" --device cuda --warmup 2 --steps 5 \
    --methods floor,floor+lean,floor+liger,paca,paca+lean,s2ft+lean,lora,lora+lean,peft-lora,full)
  MICRO=(--benchmark-max-time=0.1 --benchmark-min-rounds=3)
  SHAPES="N16384"
  TESTS=(-q -x)
fi

phase versions 20 versions
phase build 90 build
phase step-benchmark 140 $PY -m slimtune bench "${BENCH[@]}" --out "$RESULTS"
phase profile 75 $PY -m slimtune profile "${PROFILE[@]}" --out "$RESULTS/profile"
phase backend-choice 70 $PY -m pytest benchmarks/bench_lora.py benchmarks/bench_kernels.py -p no:cacheprovider \
  -k "(test_lora_linear or test_lora_input_grad or test_column_grad) and ($SHAPES)" "${MICRO[@]}" \
  --benchmark-json "$RESULTS/backend-choice.json"
phase prefer 10 $PY benchmarks/prefer.py "$RESULTS/backend-choice.json" --out "$RESULTS/prefer.md"
GPU_TESTS=(tests/test_paca_layer.py tests/test_cpp_kernels.py tests/test_lora_kernels.py tests/test_paca_models.py)
phase gpu-tests-count 20 $PY -m pytest -m gpu tests --collect-only -q -p no:cacheprovider
phase gpu-tests 60 $PY -m pytest -m gpu "${GPU_TESTS[@]}" "${TESTS[@]}" -p no:cacheprovider
echo "GPU tests run: ${GPU_TESTS[*]}; the other -m gpu tests (see gpu-tests-count.log) were not run in this budget"
phase kernel-microbenchmarks 25 $PY -m pytest benchmarks/bench_kernels.py benchmarks/bench_lora.py -p no:cacheprovider \
  -k "not (test_lora_linear or test_lora_input_grad or test_column_grad) and ($SHAPES)" "${MICRO[@]}" \
  --benchmark-json "$RESULTS/kernels.json"

echo "=== summary (at ${SECONDS}s)"
cat "$RESULTS/phases.tsv"
for f in "$RESULTS"/prefer.md "$RESULTS"/profile/profile.md "$RESULTS"/bench-*.md; do
  [ -f "$f" ] && { echo; echo "--- $f"; tail -n 25 "$f"; }
done
save
