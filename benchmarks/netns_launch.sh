#!/usr/bin/env bash
# Runs benchmarks/bench_comm.py (which builds network namespaces, veth links
# and tc tbf limits, and starts torchrun in each "host"), then removes every
# namespace it may have left (dsxb*), whatever happened. Needs root.
#
#   sudo benchmarks/netns_launch.sh [--quick] [--steps N] [--out PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  echo "netns_launch.sh: needs root (ip netns, tc)" >&2
  exit 1
fi
command -v ip >/dev/null && command -v tc >/dev/null || { echo "needs iproute2 (ip, tc)" >&2; exit 1; }
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep '^dsxb' || true); do ip netns del "$ns" || true; done
  ip link del dsxbv0 2>/dev/null || true
}
trap cleanup EXIT INT TERM
"$PY" benchmarks/bench_comm.py "$@"
