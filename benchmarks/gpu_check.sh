#!/usr/bin/env bash
# The GPU check (`make gpu-check`): run on a machine with one NVIDIA GPU,
# python3, torch (CUDA build), nvcc, ninja, pybind11 and pytest, and no network.
#   1. builds the extension in place for the GPU it finds (sm_90a on Hopper),
#   2. runs the CUDA tests (pytest -m cuda: each compares the CUDA path against
#      torch and the CPU path; the CPU tests run in CI),
#   3. runs the GPU benchmarks: each writes its table straight to
#      benchmarks/results/<bench>_<gpu>.md (e.g. gemm_h200.md),
#   4. runs the demo's GPU preset (GPT-2 small's architecture, bf16 baseline vs
#      the low-cost recipe, about 4 minutes): benchmarks/results/demo_gpt2-small_<gpu>.md,
#   5. runs the demo's smoke run on the GPU.
# Logs, the environment, a copy of every table written and a short summary go
# to $OUT (default build/gpu-check). Build inputs that would need a download
# (CUTLASS headers, bitsandbytes) are staged beforehand by `make gpu-prep` into
# third_party/; carry that folder to the GPU machine. See benchmarks/GPU.md.
#
# Environment:
#   GPU_CHECK_BUDGET   seconds for the whole check (default 0: no limit). Each
#                      step has its own time limit, cut to what the budget has
#                      left, so that a hanging step costs its limit and no more.
#   GPU_CHECK_ARCHIVE  a .tar.gz path refreshed after every step with $OUT and
#                      the tables written so far: what a killed run had
#                      finished is still in it.
#   GPU_CHECK_STEPS    what runs after the build, in order (default: tests,
#                      demo_gpt2, the GPU benchmarks, demo_smoke), e.g.
#                      "tests bench_gemm". The whole list does not fit one
#                      9-minute device call: benchmarks/GPU.md says which
#                      steps to name per call.
#   GPU_CHECK_TESTS    pytest selection (default "-m cuda tests/python").
#   GPU_CHECK_ARCH     arch list override for the build, e.g. "8.0+PTX" on a
#                      Hopper GPU: only the Ampere kernels, run through the
#                      driver's JIT. Its tables are not the GPU's own: they go
#                      to $OUT only, and benchmarks/results/ is left alone.
#   BENCH_COMMIT       the commit the tree was copied from, for the tables'
#                      headers where the copy has no .git (benchmarks/common.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-0}
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
TESTS=${GPU_CHECK_TESTS:--m cuda tests/python}
# The benchmarks whose code changed since their last GPU table go first, in
# case the budget runs out (benchmarks/GPU.md, "Open questions").
STEPS=${GPU_CHECK_STEPS:-tests demo_gpt2 bench_sparse_ffn bench_quant bench_gemm bench_unscale bench_shared_attention bench_scaler demo_smoke}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
declare -A status
order=()
written=()
t0=$(date +%s)

cap=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: torch sees no CUDA GPU"; exit 1; }
case "$cap" in 9.0) arch="9.0a" ;; *) arch="$cap" ;; esac
arch=${GPU_CHECK_ARCH:-$arch}
gpu=$($PY -c "from benchmarks.common import device_class; print(device_class('cuda'))") || gpu=gpu
results=benchmarks/results
[[ -n ${GPU_CHECK_ARCH:-} ]] && results=$OUT
export TORCH_CUDA_ARCH_LIST="$arch"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# Python packages staged by `make gpu-prep` (bitsandbytes for bench_quant).
[[ -d third_party/site ]] && export PYTHONPATH="$PWD/third_party/site${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  $PY -c "import torch, sys; print('gpu:', torch.cuda.get_device_name()); print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('python:', sys.version.split()[0])"
  nvcc --version | tail -1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
  echo "arch list: $arch; device class: $gpu; cpu cores: $(nproc)"
  $PY -c "import bitsandbytes; print('bitsandbytes:', bitsandbytes.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"

pack() {
  if [[ -n $ARCHIVE ]]; then
    tar czf "$ARCHIVE.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
  fi
  return 0
}

step() {  # step NAME LIMIT_SECONDS LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local s rc
  s=$(date +%s)
  if (( BUDGET > 0 )); then
    local left=$(( BUDGET - (s - t0) - 10 ))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then status[$name]="not run (budget spent)"; order+=("$name"); return; fi
  fi
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$log" 2>&1; rc=$?
  case $rc in
    0) status[$name]="ok" ;;
    124|137) status[$name]="TIMED OUT after ${limit}s (see $log)" ;;
    *) status[$name]="FAILED rc=$rc (see $log)" ;;
  esac
  status[$name]="${status[$name]} $(( $(date +%s) - s ))s"
  order+=("$name")
  tail -3 "$OUT/$log"
}

step build 300 build.log "$PY" setup.py build_ext --inplace
pack
if [[ ${status[build]} == ok* ]]; then
  for name in $STEPS; do
    case $name in
      tests)
        pytest_args=(-q -rfEs --durations=15)
        $PY -c "import xdist" 2>/dev/null && pytest_args+=(-n 4)
        $PY -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 150)
        # shellcheck disable=SC2086
        step tests 180 pytest.log $PY -m pytest "${pytest_args[@]}" $TESTS ;;
      demo_gpt2)
        table="$results/demo_gpt2-small_$gpu.md"
        step demo_gpt2 300 demo_gpt2.log "$PY" -m deepseek_ext.demo --device cuda --preset gpt2-small \
          --out "$OUT/demo_gpt2" --results-dir "$results"
        if [[ ${status[demo_gpt2]} == ok* && -f $table ]]; then
          [[ $results == "$OUT" ]] || cp "$table" "$OUT/"
          written+=("$table")
        fi ;;
      demo_smoke)
        step demo_smoke 90 demo_smoke.log "$PY" -m deepseek_ext.demo --smoke --device cuda --out "$OUT/demo_smoke" ;;
      bench_*)
        # bench_comm needs network namespaces and several hosts; bench_data and
        # bench_progressive measure the CPU-side pipeline and schedule: CPU only.
        # Three alternating rounds each: the GPU's run-to-run spread is far
        # smaller than a shared CPU's, and a lent GPU's time is short.
        extra=() limit=90
        # shellcheck disable=SC2054  # --sizes takes a comma-separated list
        case $name in
          bench_unscale) extra=(--rounds 3 --min-run-time 0.1) ;;
          # 16M and 256M: 1M is launch-bound.
          bench_quant) extra=(--rounds 3 --min-run-time 0.1 --sizes 16M,256M) limit=200 ;;
          bench_gemm) extra=(--rounds 3 --min-run-time 0.2) limit=120 ;;
          bench_sparse_ffn) extra=(--rounds 3 --min-run-time 0.2 --profile 0.3) limit=180 ;;
          bench_scaler) extra=(--rounds 3) ;;
          bench_shared_attention) extra=(--parts tables --rounds 3 --small-rounds 3) limit=120 ;;
        esac
        table="$results/${name#bench_}_$gpu.md"
        step "$name" "$limit" "$name.log" "$PY" "benchmarks/$name.py" --device cuda --out "$table" "${extra[@]}"
        if [[ ${status[$name]} == ok* && -f $table ]]; then
          [[ $results == "$OUT" ]] || cp "$table" "$OUT/"
          written+=("$table")
        fi ;;
      *) echo "gpu_check: unknown step $name"; status[$name]="FAILED (unknown step)"; order+=("$name") ;;
    esac
    pack
  done
fi

summary() {
  echo
  echo "## GPU check summary ($(( $(date +%s) - t0 )) s, logs in $OUT)"
  grep -h "^gpu:\|^torch:" "$OUT/environment.txt"
  for k in "${order[@]}"; do printf '%-24s %s\n' "$k" "${status[$k]}"; done
  grep -h "passed\|failed" "$OUT/pytest.log" 2>/dev/null | tail -1
  for f in "${written[@]}"; do echo; echo "$f"; sed -n '/^|/p' "$f"; done
}
summary | tee "$OUT/summary.txt"
pack
[[ "${status[*]}" != *FAILED* && "${status[*]}" != *TIMED* ]]
