#!/usr/bin/env bash
# One pass on a fresh GPU machine (torch, triton, transformers, peft, pybind11, cmake, ninja,
# pytest-benchmark, pytest-timeout; no internet), inside BUDGET seconds (default 470: under 8 minutes
# on an H100 with the build). Every phase runs in its own time box (SIGINT first, so Python writes
# what it has; SIGKILL 10 s later) and everything it writes lands in benchmarks/results/<run>/.
#
# What comes back from the device runner is only what lies directly under $OUT, at most 8 files. So
# $OUT holds, by construction, exactly:
#   gpu-check-run.tar.gz   the whole run folder, compressed, replaced atomically at every save
#   bench.md  profile.md  prefer.md  gpu-tests.txt  phases.tsv  log-tail.txt   flat summaries
# (and at most one `.partial` file, if the command is killed in the middle of a save). A save runs
# after every phase and every SAVE_EVERY seconds during one, and bench and profile rewrite their
# tables after every method, so a kill at any moment keeps every finished row.
#
# Phases, most valuable first: versions; build slimtune._C for the card; GPU tests of every kernel and
# the model-level checks (bf16, realistic shapes, LoRA against PEFT, S2FT; -v, a per-test time-out,
# no -x); the end-to-end step benchmark (anchors' protocol, lean rows too); `slimtune profile --device
# cuda` (accounted beside measured); the backend choice, one benchmark call per op; the other kernel
# microbenchmarks; last, the large C++ parametrisations. Each phase states its predicted time on an
# H100; the dry run checks that the time boxes fit the budget and the predictions fit their boxes.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # on a CPU: the same phases, files and boxes, tiny work
# Knobs: BUDGET, METHODS, BATCH, SEQ, SAVE_EVERY, BENCH_STEPS and BOX_SLACK_DRY (dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
PLANNED=470  # seconds: the phases' boxes add up to at most this (8 minutes less the device's start)
BUDGET=${BUDGET:-$PLANNED}
SAVE_EVERY=${SAVE_EVERY:-20}
# A dry run's CPU work takes what a busy CI machine gives it, not what an H100 would: it keeps the boxes
# in the plan and in phases.tsv but kills a phase only at BOX_SLACK times its box (one phase took 18 s
# of its 20 s box on a 2-core machine running two other jobs).
BOX_SLACK=1
[ "$DRY" = 1 ] && BOX_SLACK=${BOX_SLACK_DRY:-6}
export PY DRY PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=gpu-check-$STAMP
RESULTS=benchmarks/results/$RUN
[ "$DRY" = 1 ] && RESULTS=${DRY_RESULTS:-$(mktemp -d)}/$RUN
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
# Packages the card lacks (liger-kernel, for the +liger rows and the composition test) travel as wheels
# in .whl/ (see /work/.library/device/README.md); installed beside the card's own, never over them.
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
printf 'phase\trc\tseconds\tlimit\tpredicted\n' > "$RESULTS/phases.tsv"
[ "$DRY" = 1 ] && echo "DRY RUN on $(uname -m): structure and time boxes only; no number here is a GPU result" \
  | tee "$RESULTS/DRY_RUN"

# phase name, time box (s), predicted on an H100 (s); the boxes add up to at most PLANNED.
PHASES=(
  "versions 15 3"
  "build 75 40"
  "gpu-tests 110 75"
  "step-benchmark 100 75"
  "profile 70 50"
  "backend-lora_linear 20 12"
  "backend-lora_input_grad 20 12"
  "backend-column_grad 20 12"
  "prefer 10 2"
  "kernel-microbenchmarks 20 15"
  "gpu-tests-cpp 10 8"
)

# save: the run folder as one archive plus the flat summaries, each renamed into place in $OUT.
save() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  (
    command -v flock >/dev/null && flock -w 60 9  # one save at a time: the phase's own waits for the saver's
    tail -n 300 "$RESULTS/gpu_check.log" > "$RESULTS/log-tail.txt" 2>/dev/null
    tar -czf "$OUT/.partial" --exclude=.save.lock -C "$(dirname "$RESULTS")" "$RUN" 2>/dev/null && mv -f "$OUT/.partial" "$OUT/gpu-check-run.tar.gz"
    local bench
    bench=$(ls -t "$RESULTS"/bench-*.md 2>/dev/null | head -1)
    for pair in "$bench:bench.md" "$RESULTS/profile/profile.md:profile.md" "$RESULTS/prefer.md:prefer.md" \
                "$RESULTS/gpu-tests.txt:gpu-tests.txt" "$RESULTS/phases.tsv:phases.tsv" \
                "$RESULTS/log-tail.txt:log-tail.txt"; do
      src=${pair%:*}
      [ -n "$src" ] && [ -f "$src" ] && cp "$src" "$OUT/.partial" && mv -f "$OUT/.partial" "$OUT/${pair##*:}"
    done
  ) 9>"$RESULTS/.save.lock"
}

# phase NAME CMD...: run CMD in NAME's time box (less if the budget is nearly spent), log it to
# NAME.log, record rc, time, box and prediction in phases.tsv, save during and after.
phase() {
  local name=$1 limit predicted
  shift
  read -r _ limit predicted <<< "$(printf '%s\n' "${PHASES[@]}" | grep "^$name ")"
  local left=$((BUDGET - SECONDS - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "=== $name: SKIPPED, the ${BUDGET}s budget is spent"
    printf '%s\tskipped\t0\t0\t%s\n' "$name" "$predicted" >> "$RESULTS/phases.tsv"
    save
    return 0
  fi
  echo "=== $name (time box ${limit}s, predicted ${predicted}s on an H100, at ${SECONDS}s)"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    set -- bash -c "$(declare -p PY DRY RESULTS TESTS); $(declare -f run_tests "$1"); $1"
  fi
  ( while sleep "$SAVE_EVERY"; do save; done ) &
  local saver=$! start=$SECONDS rc
  timeout -s INT -k 10 "$((limit * BOX_SLACK))" "$@" > >(tee "$RESULTS/$name.log") 2>&1
  rc=$?
  kill "$saver" 2>/dev/null; wait "$saver" 2>/dev/null
  case $rc in 124|130|137) echo "--- $name hit its $((limit * BOX_SLACK))s time box; what it wrote so far is kept";; esac
  echo "--- $name: rc=$rc in $((SECONDS - start))s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$predicted" >> "$RESULTS/phases.tsv"
  save
  return 0
}

# The plan itself: boxes within the budget, every prediction inside its box with a margin.
check_plan() {
  local total=0 name limit predicted bad=0
  for entry in "${PHASES[@]}"; do
    read -r name limit predicted <<< "$entry"
    total=$((total + limit))
    if [ $((predicted * 10)) -gt $((limit * 9)) ]; then
      echo "PLAN: $name predicted ${predicted}s does not fit 90% of its ${limit}s box"; bad=1
    fi
  done
  echo "PLAN: time boxes add up to ${total}s of the ${PLANNED}s planned"
  [ "$total" -le "$PLANNED" ] || { echo "PLAN: the boxes exceed the plan"; bad=1; }
  return $bad
}

versions() {
  nvidia-smi --query-gpu=name,compute_cap,clocks.max.sm,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found (CUDA C++ kernels will be skipped)"
  $PY - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("triton", "transformers", "peft", "numpy", "pytest-benchmark", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
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

# run_tests PYTEST-ARGS...: -v so every finished test is named even if the box cuts the run short; a
# per-test time-out, no -x; gpu-tests.txt keeps one line per test and pytest's closing line.
run_tests() {
  local timeout_opt=()
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout="${TEST_TIMEOUT:-60}")
  SLIMTUNE_TRITON_AUTOTUNE=0 $PY -m pytest "$@" "${TESTS[@]}" "${timeout_opt[@]}" -p no:cacheprovider -rfE 2>&1 \
    | grep --line-buffered -E "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|(passed|failed|error|no tests ran)|::" \
    | tee -a "$RESULTS/gpu-tests.txt"
}

# Every kernel at bf16 and realistic shapes (Triton: gather, scatter, column gradient, the LoRA GEMMs,
# glu_down, glu_backward, the lean path's RMSNorm, RoPE, glu and cross-entropy; CUDA C++: the twins),
# the model-level checks (PaCA, LoRA against PEFT, S2FT, lean against plain in bf16, Liger then
# slimtune, compile on the card), then each kernel file's own cases on the card.
gpu_tests() {
  run_tests -m gpu tests/test_triton_kernels.py tests/test_lora_kernels.py tests/test_lean_kernels.py \
    tests/test_cpp_kernels.py -k "not (test_gather_columns or test_scatter_columns)"
  run_tests tests/test_lora_kernels.py -k "not gpu"
  run_tests tests/test_triton_kernels.py -k "not gpu and (compact or deterministic or rounds or poisoned or empty or bad)"
  run_tests -m gpu tests/test_paca_layer.py tests/test_lora.py tests/test_s2ft.py tests/test_paca_models.py \
    tests/test_devices.py
}

# The large C++ parametrisations (about a thousand small cases), last: whatever the budget leaves.
gpu_tests_cpp() {
  run_tests -m gpu tests/test_cpp_kernels.py -k "test_gather_columns or test_scatter_columns"
}

if [ "$DRY" = 1 ]; then
  BENCH=(--model tiny --device cpu --warmup 0 --steps "${BENCH_STEPS:-1}"
    --methods "${METHODS:-floor,paca,s2ft+lean,lora,peft-lora,full}")
  PROFILE=(--model tiny --batch 2 --seq 32 --device meta --methods floor,floor+lean,paca+lean,lora,full,full-mixed)
  MICRO=(--benchmark-max-time=0.01 --benchmark-min-rounds=1 --benchmark-warmup=off)
  SHAPES="up or down"
  TESTS=(--collect-only -q)
else
  BENCH=(--model tinyllama-1.1b --batch "${BATCH:-8}" --seq "${SEQ:-2048}" --warmup 2 --steps 5 \
    --methods "${METHODS:-floor,floor+lean,floor+liger,paca,paca+lean,paca+liger,paca-partial-adamw,s2ft,s2ft+lean,lora,lora+lean,hydra,peft-lora,peft-lora-bf16,full}")
  # Lean against non-lean and against Liger-Kernel (its row errors cleanly where it is not installed).
  PROFILE=(--batch "${BATCH:-8}" --seq "${SEQ:-2048}" --device cuda --warmup 1 --steps 3 \
    --methods floor,floor+lean,floor+liger,paca,paca+lean,paca+liger,s2ft+lean,lora,lora+lean,full-mixed)
  MICRO=(--benchmark-max-time=0.05 --benchmark-min-rounds=3 --benchmark-warmup=on --benchmark-warmup-iterations=2)
  SHAPES="N16384"
  TESTS=(-v)
fi

echo "=== plan"
PLAN_OK=1
check_plan || PLAN_OK=0
phase versions versions
phase build build
: > "$RESULTS/gpu-tests.txt"
phase gpu-tests gpu_tests
phase step-benchmark $PY -m slimtune bench "${BENCH[@]}" --out "$RESULTS"
phase profile $PY -m slimtune profile "${PROFILE[@]}" --out "$RESULTS/profile"
for op in lora_linear lora_input_grad column_grad; do
  phase "backend-$op" $PY -m pytest benchmarks/bench_lora.py benchmarks/bench_kernels.py -p no:cacheprovider -q \
    -k "test_$op and ($SHAPES)" "${MICRO[@]}" --benchmark-json "$RESULTS/backend-$op.json"
done
phase prefer $PY benchmarks/prefer.py "$RESULTS"/backend-*.json --out "$RESULTS/prefer.md"
phase kernel-microbenchmarks $PY -m pytest benchmarks/bench_kernels.py benchmarks/bench_lora.py -p no:cacheprovider -q \
  -k "not (test_lora_linear or test_lora_input_grad or test_column_grad) and ($SHAPES)" "${MICRO[@]}" \
  --benchmark-json "$RESULTS/kernels.json"
phase gpu-tests-cpp gpu_tests_cpp

echo "=== summary (at ${SECONDS}s)"
cat "$RESULTS/phases.tsv"
for f in "$RESULTS"/prefer.md "$RESULTS"/profile/profile.md "$(ls -t "$RESULTS"/bench-*.md 2>/dev/null | head -1)"; do
  [ -f "$f" ] && { echo; echo "--- $f"; tail -n 25 "$f"; }
done
save
[ "$PLAN_OK" = 1 ] || { echo "PLAN CHECK FAILED: see the PLAN lines at the top"; exit 3; }
