"""Where a results table came from: the CPU model, the GPU class that names a
results file, and the commit of the checkout. Shared by the benchmarks
(benchmarks/common.py) and the demo's results file."""

import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def gpu_class(name: str) -> str:
    """A GPU's model in lower case without vendor and variant words ("NVIDIA H100
    80GB HBM3" -> "h100", "NVIDIA A100-SXM4-40GB" -> "a100", "NVIDIA GeForce RTX
    4090" -> "rtx4090"): the device class of a results file's name."""
    words = [w for w in re.split(r"[\s_]+", name) if w.lower() not in ("nvidia", "geforce", "tesla", "quadro")]
    if not words:
        return "gpu"
    first = words[0].split("-")[0].lower()
    if first in ("rtx", "gtx") and len(words) > 1:
        first += words[1].split("-")[0].lower()
    return re.sub(r"[^a-z0-9]", "", first) or "gpu"


def git_commit(root: Path = ROOT) -> str:
    """The git short hash of the checkout at ``root`` ("+ uncommitted changes" when
    tracked files differ from it). BENCH_COMMIT overrides it, for copies of the
    tree without .git (a GPU machine's)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        git = ["git", "-C", str(root)]
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != Path(root).resolve():
            # A copy of the tree inside another checkout (CI's torch-newest copy):
            # that checkout's commit is not this tree's.
            return "unknown (no git checkout; set BENCH_COMMIT)"
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout; set BENCH_COMMIT)"
    return f"{head} + uncommitted changes" if dirty else head
