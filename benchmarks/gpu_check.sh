#!/usr/bin/env bash
# The GPU check: run on a machine with one NVIDIA GPU, python3, torch (CUDA
# build), nvcc, ninja, pybind11 and pytest, and no network. It
#   1. builds the extension in place for the GPU it finds (sm_90a on Hopper),
#   2. runs every Python test (CUDA tests compare against torch and the CPU path),
#   3. runs the GPU benchmarks,
# writes logs and result tables to $OUT (default benchmarks/results/gpu-<date>/)
# and prints a short summary table last. Build inputs that would need a
# download are staged beforehand by `make gpu-prep` into third_party/.
# GPU_CHECK_ARCH overrides the arch list: GPU_CHECK_ARCH="8.0+PTX" on a Hopper
# GPU builds only the Ampere kernels and runs them through the driver's JIT,
# which exercises the fused sm80 GEMM where no sm_8x GPU is at hand.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
declare -A status
t0=$(date +%s)

cap=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: torch sees no CUDA GPU"; exit 1; }
case "$cap" in 9.0) arch="9.0a" ;; *) arch="$cap" ;; esac
arch=${GPU_CHECK_ARCH:-$arch}
export TORCH_CUDA_ARCH_LIST="$arch"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  $PY -c "import torch, sys; print('gpu:', torch.cuda.get_device_name()); print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('python:', sys.version.split()[0])"
  nvcc --version | tail -1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
  echo "arch list: $arch"
} | tee "$OUT/environment.txt"

step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local s=$(date +%s)
  echo "== $name"
  if "$@" > "$OUT/$log" 2>&1; then status[$name]="ok"; else status[$name]="FAILED (see $log)"; fi
  status[$name]="${status[$name]} $(( $(date +%s) - s ))s"
  tail -3 "$OUT/$log"
}

step build build.log $PY setup.py build_ext --inplace
if [[ ${status[build]} == ok* ]]; then
  step tests pytest.log $PY -m pytest -q -rfs tests/python
  # The GPU benchmarks (bench_comm needs network namespaces and several hosts;
  # bench_data and bench_progressive measure the CPU-side pipeline and schedule).
  for name in bench_unscale bench_gemm bench_scaler bench_quant bench_sparse_ffn bench_shared_attention; do
    extra=()
    [[ $name == bench_shared_attention ]] && extra=(--parts tables)
    step "$name" "$name.log" $PY "benchmarks/$name.py" --device cuda --out "$OUT" "${extra[@]}"
  done
fi

echo
echo "## GPU check summary ($(( $(date +%s) - t0 )) s, results in $OUT)"
grep -h "^gpu:\|^torch:" "$OUT/environment.txt"
for k in "${!status[@]}"; do printf '%-24s %s\n' "$k" "${status[$k]}"; done | sort
grep -h "passed\|failed" "$OUT/pytest.log" 2>/dev/null | tail -1
for f in "$OUT"/*_cuda.md; do [ -f "$f" ] && { echo; sed -n '/^|/p' "$f"; }; done
[[ "${status[*]}" != *FAILED* ]]
