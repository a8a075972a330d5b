"""Builds deepseek_ext._C against the installed torch.

    pip install --no-build-isolation .        # or -e . for development

Environment switches:
    DEEPSEEK_EXT_CPU_ONLY=1   build without CUDA even when torch and nvcc have it
    TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0a": A100, H100/H200); the fused
                              CUTLASS GEMMs need 9.0a (sm90 kernel) or an 8.x entry (sm80 kernel)
    DEEPSEEK_EXT_CPU_ISA      "avx2" (default on x86-64: AVX2+FMA+F16C kernels through
                              at::vec, import refuses CPUs without them) or "generic"
    DEBUG=1                   -O0 -g host code, -G device code
    MAX_JOBS=N                parallel compile jobs (read by torch's BuildExtension)
The source list is csrc/sources.txt, shared with CMakeLists.txt. The C++ standard
(host and nvcc) is the installed torch's (torch_cxx_standard).
"""
import ast
import importlib.util
import os
import sys
import platform
import re
import shutil
import sysconfig
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0a"


def supported_torch():
    """SUPPORTED_TORCH of deepseek_ext/_loader.py (read, not imported: importing
    the package would try to load the library being built)."""
    tree = ast.parse((ROOT / "deepseek_ext" / "_loader.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SUPPORTED_TORCH":
            return ast.literal_eval(node.value)
    raise RuntimeError("deepseek_ext/_loader.py defines no SUPPORTED_TORCH")


def torch_cxx_standard():
    """The C++ standard of the installed torch: the one its CMake config declares
    (TorchConfig.cmake's CXX_STANDARD or cxx_std_NN: 17 for torch 2.11, 20 from
    2.12, as torch's BuildExtension uses), and at least the one ATen/ATen.h's
    __cplusplus check requires. cmake/TorchCxxStandard.cmake applies the same rule."""
    config = (Path(torch.utils.cmake_prefix_path) / "Torch" / "TorchConfig.cmake").read_text()
    found = [int(n) for n in re.findall(r"(?:CXX_STANDARD |cxx_std_)(\d+)", config)]
    aten = (Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h").read_text()
    found += [int(n) for n in re.findall(r"__cplusplus < 20(\d\d)\d\dL", aten)]
    if not found:
        raise SystemExit("cannot tell which C++ standard torch uses: neither TorchConfig.cmake nor ATen/ATen.h says")
    return max(found)


def library_sources():
    """(tag, path) pairs of csrc/sources.txt; tag is "" or e.g. "cutlass-sm90"."""
    out = []
    for ln in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        tag = ""
        if ln.startswith("["):
            tag, ln = ln[1:].split("]", 1)
        out.append((tag, ln.strip()))
    return out


def find_cutlass():
    """CUTLASS headers: $DEEPSEEK_EXT_CUTLASS_DIR, third_party/cutlass/include
    (staged by `make gpu-prep`), or the nvidia-cutlass Python package."""
    candidates = [os.environ.get("DEEPSEEK_EXT_CUTLASS_DIR"), ROOT / "third_party" / "cutlass" / "include"]
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    for c in candidates:
        if c and (Path(c) / "cutlass" / "cutlass.h").exists():
            return str(c)
    return None


def find_nvcc():
    if cpp_extension.CUDA_HOME is None:
        return None
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else shutil.which("nvcc")


torch_minor = tuple(int(v) for v in torch.__version__.split(".")[:2])
supported = supported_torch()
if torch_minor not in supported:
    raise SystemExit(
        f"deepseek_ext builds against torch {supported[0][0]}.{supported[0][1]} to {supported[-1][0]}.{supported[-1][1]}, "
        f"but the torch that setup.py imports is {torch.__version__} ({torch.__file__})"
    )
# torch's BuildExtension adds -std=c++<torch's standard> to every host and nvcc
# command that has none (tests/python/test_build.py checks that it is this one),
# placed where torch places it, so the commands stay torch's own.
cxx_std = torch_cxx_standard()

cpu_only = os.environ.get("DEEPSEEK_EXT_CPU_ONLY", "0") == "1"
debug = os.environ.get("DEBUG", "0") == "1"
nvcc = None if cpu_only or torch.version.cuda is None else find_nvcc()
with_cuda = nvcc is not None
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
arch_entries = [a for a in arch_list.replace(" ", ";").split(";") if a]
# Sources tagged [cutlass-sm90] need 9.0a in the arch list, [cutlass-sm80] an 8.x entry.
cutlass_archs = {"cutlass-sm90": "9.0a" in arch_entries, "cutlass-sm80": any(a.startswith("8.") for a in arch_entries)}
cutlass = find_cutlass() if with_cuda and any(cutlass_archs.values()) else None
cutlass_tags = {tag for tag, wanted in cutlass_archs.items() if wanted and cutlass}
sources = [
    path for tag, path in library_sources()
    if (with_cuda or not path.endswith(".cu")) and (tag == "" or tag in cutlass_tags)
]
sources.append("csrc/python/module.cpp")

cpu_isa = os.environ.get("DEEPSEEK_EXT_CPU_ISA", "avx2" if platform.machine() == "x86_64" else "generic")
if cpu_isa not in ("avx2", "generic"):
    raise SystemExit(f"DEEPSEEK_EXT_CPU_ISA must be 'avx2' or 'generic', got {cpu_isa!r}")
# at::vec picks its AVX2 implementation from these macros (as ATen's own AVX2 kernels do).
isa_flags = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"] if cpu_isa == "avx2" else []
# at::parallel_for is inline in ATen's headers: without -fopenmp (_OPENMP undefined)
# it runs every range on the calling thread. Linking -fopenmp names libgomp.so.1,
# which resolves to the one torch has already loaded.
openmp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-Wno-unknown-pragmas"] + openmp_flags + isa_flags
nvcc_flags = (["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo", "-DNDEBUG"]) + [
    "--expt-relaxed-constexpr",
    "-Xcompiler=-fno-fast-math",
] + [f"-Xcompiler={f}" for f in isa_flags if f.startswith("-m")]
macros = [("DSX_WITH_CUDA", "1" if with_cuda else "0")]
if "cutlass-sm90" in cutlass_tags:
    macros.append(("DSX_WITH_CUTLASS_SM90", "1"))
if "cutlass-sm80" in cutlass_tags:
    macros.append(("DSX_WITH_CUTLASS_SM80", "1"))
Extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
ext = Extension(
    name="deepseek_ext._C",
    sources=sources,
    include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "ops"), str(ROOT / "kernels")]
    + ([cutlass] if cutlass else []),
    define_macros=macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    extra_link_args=openmp_flags,
)

# Recorded so that `import deepseek_ext` can refuse a torch it was not built for.
(ROOT / "deepseek_ext" / "_build_config.py").write_text(
    "# Generated by setup.py; do not edit.\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
    f"CXX_STANDARD = {cxx_std!r}\n"
    f"WITH_CUDA = {with_cuda!r}\n"
    f"WITH_CUTLASS_SM90 = {'cutlass-sm90' in cutlass_tags!r}\n"
    f"WITH_CUTLASS_SM80 = {'cutlass-sm80' in cutlass_tags!r}\n"
    f"CPU_ISA = {cpu_isa!r}\n"
    f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if with_cuda else ''!r}\n"
)

print(
    "deepseek_ext build configuration:\n"
    f"  torch            {torch.__version__} (CUDA {torch.version.cuda})\n"
    f"  C++ standard     C++{cxx_std} (the installed torch's; host and nvcc)\n"
    f"  CUDA kernels     {'yes, nvcc ' + nvcc if with_cuda else 'no'}"
    f"{' (DEEPSEEK_EXT_CPU_ONLY=1)' if cpu_only else ''}\n"
    f"  arch list        {os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'}\n"
    f"  CUTLASS sm90     {cutlass if 'cutlass-sm90' in cutlass_tags else 'no (needs CUTLASS headers and 9.0a)'}\n"
    f"  CUTLASS sm80     {cutlass if 'cutlass-sm80' in cutlass_tags else 'no (needs CUTLASS headers and an 8.x arch)'}\n"
    f"  CPU ISA          {cpu_isa}\n"
    f"  debug            {debug}\n"
    f"  MAX_JOBS         {os.environ.get('MAX_JOBS', 'default')}\n"
    f"  sources          {len(sources)} ({sum(s.endswith('.cu') for s in sources)} CUDA)",
    flush=True,
)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, compiling in build/temp.* even under pip's editable
    build (`pip install -e .`), which would use a new temporary folder each time:
    ninja there recompiles only what changed."""

    def finalize_options(self):
        if self.build_temp is None:
            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
        super().finalize_options()


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
