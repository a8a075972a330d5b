#!/usr/bin/env bash
# Static instruction counts (sm_90a SASS) of the kernels in sr_codes.cu; no GPU
# needed. cuobjdump and nvdisasm are not in the CUDA 13.0 toolkit image we build
# with: they come from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) into
# build/sass-tools on first use.
#   bash benchmarks/gpu/sass/count.sh [file.cu]
set -euo pipefail
cd "$(dirname "$0")/../../.."
SRC=${1:-benchmarks/gpu/sass/sr_codes.cu}
TOOLS=build/sass-tools
PY=${PY:-.venv/bin/python}
if [ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" ]; then
  mkdir -p "$TOOLS"
  "$PY" -m pip download -q --no-deps -d "$TOOLS" "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.2.51"
  for w in "$TOOLS"/*.whl; do "$PY" -m zipfile -e "$w" "$TOOLS"; done
  chmod +x "$TOOLS"/nvidia/cu13/bin/*
fi
OUTD=$(mktemp -d)
nvcc -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -cubin \
  -Icsrc/include -Xptxas -v "$SRC" -o "$OUTD/k.cubin" 2> "$OUTD/ptxas.log"
PATH="$TOOLS/nvidia/cu13/bin:$PATH" cuobjdump -sass "$OUTD/k.cubin" > "$OUTD/k.sass"
"$PY" tools/sass_mix.py "$OUTD/k.sass" --per 16
awk '/Compiling entry/ { match($0, /_Z[^'"'"']*/); name = substr($0, RSTART, RLENGTH) }
     /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); print name ": " substr($0, RSTART + 5, RLENGTH - 5) " registers" }' "$OUTD/ptxas.log"
rm -rf "$OUTD"
