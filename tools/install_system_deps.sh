#!/usr/bin/env bash
# Installs the Debian packages the build and tests need, if any is missing:
# a C++ compiler, CMake, Ninja, GoogleTest and ccache (optional: the Makefile
# uses it when it is there, checked when each build runs). The CUDA toolkit is not
# installed here: CUDA kernels are compiled when nvcc is found (CUDA_HOME or
# /usr/local/cuda), otherwise the build is CPU-only.
set -euo pipefail

missing=()
optional=()
command -v g++ >/dev/null || missing+=(g++)
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v ccache >/dev/null || optional+=(ccache)
[ -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake ] || [ -f /usr/lib/cmake/GTest/GTestConfig.cmake ] \
  || [ -f /usr/lib/aarch64-linux-gnu/cmake/GTest/GTestConfig.cmake ] || missing+=(libgtest-dev)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)

if [ "$(id -u)" -ne 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "not root: please run  sudo apt-get install -y ${missing[*]} ${optional[*]}" >&2
    exit 1
  elif [ ${#optional[@]} -gt 0 ]; then
    echo "note: rebuilds are faster with ccache (sudo apt-get install -y ccache)" >&2
  fi
  exit 0
fi
missing+=("${optional[@]}")
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
