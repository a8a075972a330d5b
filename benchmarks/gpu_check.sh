#!/usr/bin/env bash
# The GPU check: run on a machine with one NVIDIA GPU, python3, torch (CUDA
# build), nvcc, ninja, pybind11 and pytest, and no network. It
#   1. builds the extension in place for the GPU it finds (sm_90a on Hopper),
#   2. runs the CUDA tests (pytest -m cuda: each compares the CUDA path against
#      torch and the CPU path; the CPU tests run in CI),
#   3. runs the GPU benchmarks, then the demo's smoke run on the GPU,
# writes logs and result tables to $OUT (default benchmarks/results/gpu-<date>/)
# and prints a short summary table last. Build inputs that would need a
# download (CUTLASS headers, bitsandbytes) are staged beforehand by
# `make gpu-prep` into third_party/; carry that folder to the GPU machine.
#
# Environment:
#   GPU_CHECK_ARCH     arch list override. "8.0+PTX" on a Hopper GPU builds only
#                      the Ampere kernels and runs them through the driver's JIT,
#                      which exercises the fused sm80 GEMM where no sm_8x GPU is at hand.
#   GPU_CHECK_BUDGET   seconds for the whole check (default 0: no limit). Each
#                      step gets its own time limit, cut to what the budget has
#                      left, so that a hanging step costs its limit and no more.
#   GPU_CHECK_ARCHIVE  a .tar.gz path refreshed after every step with all of
#                      $OUT: what a killed run had finished is still in it.
#   GPU_CHECK_TESTS    pytest selection (default "-m cuda tests/python": the CUDA tests).
#   GPU_CHECK_STEPS    what runs after the build, in order, e.g. "tests bench_gemm"
#                      (default: tests, bench_quant, bench_gemm, ncu_gemm (the GEMM
#                      launches under Nsight Compute, where it can read counters),
#                      gemm_kernels (cuBLAS's and our GEMM kernels by name),
#                      bench_gemm_sm90_variants (other CUTLASS configurations of the
#                      fused GEMM, its own extension, built in the background), then
#                      the other GPU benchmarks and demo_smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
BUDGET=${GPU_CHECK_BUDGET:-0}
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
TESTS=${GPU_CHECK_TESTS:--m cuda tests/python}
# Default order: what the open issues still need measured first, in case the budget runs
# out (benchmarks/gpu_notes.md, "Next GPU session"). The last five steps measure code that
# has not changed since their last GPU tables (2026-11-28).
STEPS=${GPU_CHECK_STEPS:-tests bench_quant bench_gemm ncu_gemm gemm_kernels bench_gemm_sm90_variants bench_unscale bench_shared_attention bench_sparse_ffn bench_scaler demo_smoke}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
declare -A status
order=()
t0=$(date +%s)

cap=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: torch sees no CUDA GPU"; exit 1; }
case "$cap" in 9.0) arch="9.0a" ;; *) arch="$cap" ;; esac
arch=${GPU_CHECK_ARCH:-$arch}
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
  echo "arch list: $arch; cpu cores: $(nproc)"
  $PY -c "import bitsandbytes; print('bitsandbytes:', bitsandbytes.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"

pack() {
  [[ -n $ARCHIVE ]] && tar czf "$ARCHIVE.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
  return 0
}

step() {  # step NAME LIMIT_SECONDS LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local s=$(date +%s) rc
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
  pack
}

step build 300 build.log $PY setup.py build_ext --inplace
if [[ ${status[build]} == ok* ]]; then
  # The GEMM variants are their own extension: compile them in the background
  # (a few cores, while the tests run) so that their step only times them.
  if [[ " $STEPS " == *" bench_gemm_sm90_variants "* && $cap == 9.0 ]]; then
    $PY benchmarks/bench_gemm_sm90_variants.py --build-only > "$OUT/bench_gemm_sm90_variants_build.log" 2>&1 &
  fi
  for name in $STEPS; do
    case $name in
      tests)
        pytest_args=(-q -rfEs --durations=15)
        $PY -c "import xdist" 2>/dev/null && pytest_args+=(-n 4)
        $PY -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 150)
        # shellcheck disable=SC2086
        step tests 180 pytest.log $PY -m pytest "${pytest_args[@]}" $TESTS ;;
      demo_smoke)
        step demo_smoke 90 demo_smoke.log $PY -m deepseek_ext.demo --smoke --device cuda ;;
      gemm_kernels)
        # cuBLAS's and our kernel names and times at 8192^3 (torch.profiler).
        step gemm_kernels 60 gemm_kernels.log $PY benchmarks/gpu/gemm_kernels.py ;;
      ncu_gemm)
        # cuBLAS's float16 -> float32 kernel and ours (CUTLASS device_kernel) under
        # Nsight Compute (hardware counters; the lent machine's runtime decides
        # whether ncu can read them: it did on 2026-11-28 19:35).
        if ! command -v ncu > /dev/null; then status[$name]="not run (no ncu)"; order+=("$name"); continue; fi
        step ncu_gemm 120 ncu_gemm.log ncu --clock-control none -k 'regex:nvjet_sm90_hss|device_kernel' -c 2 \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis \
          $PY benchmarks/gpu/gemm_kernels.py --no-profiler ;;
      bench_*)
        # The GPU benchmarks (bench_comm needs network namespaces and several hosts;
        # bench_data and bench_progressive measure the CPU-side pipeline and schedule).
        # Three alternating rounds each: the GPU's run-to-run spread is far smaller
        # than the CPU's, and the lease is short.
        extra=() limit=90
        case $name in
          bench_unscale) extra=(--rounds 3 --min-run-time 0.1) ;;
          # 16M and 256M: 1M is launch-bound. With the *_div rows about 75 s per dtype on an H200 (estimate).
          bench_quant) extra=(--rounds 3 --min-run-time 0.1 --sizes 16M,256M) limit=200 ;;
          bench_gemm) extra=(--rounds 3 --min-run-time 0.2) limit=120 ;;
          bench_sparse_ffn) extra=(--rounds 3 --min-run-time 0.2 --profile 0.3) ;;
          bench_scaler) extra=(--rounds 3) ;;
          bench_shared_attention) extra=(--parts tables --rounds 3 --small-rounds 3) limit=120 ;;
          # Its own extension (4 CUTLASS configurations), built in the background above;
          # the step waits for that build (torch's extension lock) if it is still running.
          bench_gemm_sm90_variants)
            if [[ $cap != 9.0 ]]; then status[$name]="not run (needs sm_90)"; order+=("$name"); continue; fi
            extra=(--rounds 3 --min-run-time 0.2) limit=300 ;;
        esac
        step "$name" "$limit" "$name.log" $PY "benchmarks/$name.py" --device cuda --out "$OUT" "${extra[@]}" ;;
      *) echo "gpu_check: unknown step $name"; status[$name]="FAILED (unknown step)"; order+=("$name") ;;
    esac
  done
fi

summary() {
  echo
  echo "## GPU check summary ($(( $(date +%s) - t0 )) s, results in $OUT)"
  grep -h "^gpu:\|^torch:" "$OUT/environment.txt"
  for k in "${order[@]}"; do printf '%-24s %s\n' "$k" "${status[$k]}"; done
  grep -h "passed\|failed" "$OUT/pytest.log" 2>/dev/null | tail -1
  for f in "$OUT"/*_cuda.md; do [ -f "$f" ] && { echo; sed -n '/^|/p' "$f"; }; done
}
summary | tee "$OUT/summary.txt"
pack
[[ "${status[*]}" != *FAILED* && "${status[*]}" != *TIMED* ]]
