# deepseek_ext — every target sets up what it needs (venv, pinned packages,
# Debian packages, build) and is quick when that is already done.
#
#   make demo        the main job: train a small LM, baseline vs low-cost recipe (runs/demo-*,
#                    benchmarks/results/demo_<device>.md)
#   make test        build everything, run CTest (GoogleTest + C++ example) and pytest
#   make test-newest pytest against the newest torch release, in its own venv and tree copy
#   make build       the Python extension: pip install -e . (editable, incremental)
#   make build-cpp   the C++ library with CMake, installed to build/install, + example
#   make bench       every benchmark; tables go to benchmarks/results/
#   make gpu-prep    stage build inputs a GPU machine without network needs (third_party/)
#   make gpu-check   on a GPU machine: build for it, CUDA tests, GPU benchmarks ($OUT)
#   make install-check  pip install . into a fresh venv and import it (slow: full build)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.requirements-installed
export MAX_JOBS ?= $(shell nproc)

NVCC := $(or $(shell command -v nvcc),$(wildcard /usr/local/cuda/bin/nvcc))
# A compiler cache for g++ and nvcc when ccache is installed. Decided when a
# recipe runs, not when make reads this file: `sysdeps` may install ccache on
# the first run, and the build commands must not change on the next one.
# Paths under the checkout are hashed relative to it, and not the folder a
# compiler runs in (it differs per clone, and -g would hash it): clones share the cache.
WITH_CCACHE = if command -v ccache >/dev/null; then \
	  export PATH="/usr/lib/ccache:$$PATH" CCACHE_BASEDIR="$${CCACHE_BASEDIR:-$(CURDIR)}" \
	    CCACHE_NOHASHDIR="$${CCACHE_NOHASHDIR-1}"; \
	  $(if $(NVCC),export PYTORCH_NVCC="$${PYTORCH_NVCC:-ccache $(NVCC)}";) fi;
CMAKE_CACHE_FLAGS = $$(command -v ccache >/dev/null && \
	  echo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)

# `make build` runs pip only when a source, setup.py, pyproject.toml, the
# version, the pinned packages or a build switch changed, or the library is
# missing; pip's editable build compiles in build/temp.* (setup.py keeps that
# folder), where ninja recompiles only what changed.
BUILD_STAMP := build/.python-ext-built
BUILD_SWITCHES := $(strip $(DEEPSEEK_EXT_CPU_ONLY)|$(TORCH_CUDA_ARCH_LIST)|$(DEEPSEEK_EXT_CPU_ISA)|$(DEBUG)|$(DEEPSEEK_EXT_CUTLASS_DIR))
EXT_INPUTS := $(shell find csrc kernels -type f 2>/dev/null) setup.py pyproject.toml deepseek_ext/_version.py
REBUILD := $(if $(wildcard deepseek_ext/_C*.so),,FORCE)
ifneq ($(BUILD_SWITCHES),$(strip $(shell cat $(BUILD_STAMP) 2>/dev/null)))
REBUILD := FORCE
endif

.PHONY: FORCE help sysdeps deps build build-cpp test test-cpp test-python test-newest demo bench gpu-prep gpu-check install-check clean

help:
	@sed -n '2,13p' Makefile

sysdeps:
	@bash tools/install_system_deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

deps: sysdeps $(DEPS_STAMP)

build: deps $(BUILD_STAMP)

$(BUILD_STAMP): $(EXT_INPUTS) $(DEPS_STAMP) $(REBUILD) | sysdeps
	$(WITH_CCACHE) $(PY) -m pip install --no-build-isolation --no-deps -v -e .
	@echo '$(BUILD_SWITCHES)' > $@

build-cpp: deps
	@[ -f build/cmake/build.ninja ] || cmake -S . -B build/cmake -G Ninja $(CMAKE_CACHE_FLAGS) \
	  -DPython3_EXECUTABLE=$(abspath $(PY))
	$(WITH_CCACHE) cmake --build build/cmake
	cmake --install build/cmake --prefix build/install > /dev/null
	@[ -f build/example/build.ninja ] || cmake -S tests/cpp/example -B build/example -G Ninja \
	  -DCMAKE_PREFIX_PATH="$(abspath build/install);$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/example

test-cpp: build-cpp
	ctest --test-dir build/cmake --output-on-failure
	build/example/unscale_example

# PYTEST_ARGS: what pytest runs (default: the whole Python suite).
PYTEST_ARGS ?= tests/python
test-python: build
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test: test-cpp test-python

# The Python suite against the newest torch release (NEWEST_TORCH), beside the
# pinned one: its own venv (requirements.txt with that torch) and its own copy of
# the tree under build/torch-newest/src (its .venv inside it, so that ccache
# sees the same relative paths in every clone), built there with CPU kernels
# only, so the .venv build of this tree stays as it is. The copy is refreshed
# from the checkout's files on every run (ninja and ccache make the rebuild
# incremental).
# Its loader test imports this tree's library, when that is built for another
# torch minor version, and expects the mismatch error.
NEWEST_TORCH ?= 2.15.0
NEWEST_DIR := build/torch-newest
NEWEST_MINOR := $(word 1,$(subst ., ,$(NEWEST_TORCH))).$(word 2,$(subst ., ,$(NEWEST_TORCH)))
OTHER_BUILD := $(if $(wildcard deepseek_ext/_C*.so),$(if $(shell grep -s "^TORCH_VERSION = '$(NEWEST_MINOR)\." \
  deepseek_ext/_build_config.py),,$(CURDIR)))
test-newest:
	@mkdir -p $(NEWEST_DIR)/src
	git ls-files -z --cached --others --exclude-standard | grep -zv '^requirements.txt$$' | \
	  tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C $(NEWEST_DIR)/src
	@sed 's/^torch==.*/torch==$(NEWEST_TORCH)/' requirements.txt > $(NEWEST_DIR)/requirements.txt
	@cmp -s $(NEWEST_DIR)/requirements.txt $(NEWEST_DIR)/src/requirements.txt || \
	  cp $(NEWEST_DIR)/requirements.txt $(NEWEST_DIR)/src/requirements.txt
	DEEPSEEK_EXT_CPU_ONLY=1 DEEPSEEK_EXT_OTHER_BUILD=$(OTHER_BUILD) \
	  $(MAKE) -C $(NEWEST_DIR)/src test-python

# The main job (python -m deepseek_ext.demo); DEMO_ARGS e.g. "--ablate" or "--device cuda".
# Its table also goes to benchmarks/results/demo_<device class>.md (not for --smoke runs).
DEMO_ARGS ?=
demo: build
	$(PY) -m deepseek_ext.demo $(if $(findstring --smoke,$(DEMO_ARGS)),,--results-dir benchmarks/results) $(DEMO_ARGS)

# bench_comm.py builds hosts in network namespaces: only as root, through netns_launch.sh.
bench: build
	@for b in benchmarks/bench_*.py; do \
	  if [ "$$b" = benchmarks/bench_comm.py ]; then continue; fi; \
	  echo "== $$b"; $(PY) $$b || exit 1; done
	@if [ "$$(id -u)" = 0 ]; then echo "== benchmarks/bench_comm.py"; PY=$(abspath $(PY)) bash benchmarks/netns_launch.sh; \
	  else echo "== benchmarks/bench_comm.py skipped: needs root (sudo benchmarks/netns_launch.sh)"; fi

# The GPU machine has no network: stage the CUTLASS headers (from the pinned
# nvidia-cutlass package) and bitsandbytes (bench_quant's peer baseline; a
# Python 3.12 wheel with only its CUDA 13.0 library, 4.5 MB instead of 43) into
# third_party/ and carry that folder there. gpu_check.sh puts
# third_party/site on PYTHONPATH.
BNB_VERSION := 0.50.2
gpu-prep: deps
	rm -rf third_party/cutlass && mkdir -p third_party/cutlass
	cp -r "$$($(PY) -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')" third_party/cutlass/include
	rm -rf third_party/site third_party/wheels && mkdir -p third_party/site third_party/wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_24_x86_64 -d third_party/wheels bitsandbytes==$(BNB_VERSION)
	cd third_party/site && unzip -q ../wheels/bitsandbytes-*.whl -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
	  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
	rm -rf third_party/wheels
	@du -sh third_party/cutlass third_party/site

gpu-check:
	$(WITH_CCACHE) bash benchmarks/gpu_check.sh

install-check: deps
	rm -rf build/install-check && $(PYTHON) -m venv build/install-check/venv
	build/install-check/venv/bin/pip install -q -r requirements.txt
	$(WITH_CCACHE) build/install-check/venv/bin/pip install -q --no-build-isolation .
	cd /tmp && $(abspath build/install-check/venv/bin/python) -c \
	  "import torch, deepseek_ext; print(torch.ops.deepseek_ext.unscale_and_check_)"

clean:
	rm -rf build deepseek_ext/_C*.so deepseek_ext/_build_config.py deepseek_ext.egg-info
