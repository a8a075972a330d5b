"""Helpers shared by the benchmarks: timing, machine description, tables.

Every benchmark writes one markdown file per device class,
benchmarks/results/<name>_<device class>.md (device class: "cpu", or the GPU
model in lower case, e.g. "h200"); a new run overwrites it and git keeps the
history. The header records date, machine, torch version and commit.
"""

import datetime
import os
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tb

from deepseek_ext._provenance import cpu_model, git_commit, gpu_class  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def device_class(device: str) -> str:
    """The results-file suffix for a device: "cpu", or the GPU model in lower
    case without vendor and variant words ("NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-40GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx4090")."""
    if not str(device).startswith("cuda"):
        return "cpu"
    return gpu_class(torch.cuda.get_device_name())


def machine(device: str) -> str:
    """CPU model and torch's thread count, or the GPU's name, SMs and memory."""
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
                f"CUDA {torch.version.cuda}; host: {cpu_model()}, {os.cpu_count()} cores")
    return f"{cpu_model()}, {torch.get_num_threads()} threads (each timed call runs with all of them)"


def commit() -> str:
    """The checkout's commit (BENCH_COMMIT overrides it): see deepseek_ext._provenance."""
    return git_commit(ROOT)


def header(title: str, device: str) -> str:
    return (
        f"# {title}\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {machine(device)}\n"
        f"- torch: {torch.__version__}\n"
        f"- commit: {commit()}\n"
    )


def median_seconds(fn, device: str, min_run_time: float = 1.0) -> float:
    """Median time of fn() in seconds. torch.utils.benchmark synchronises CUDA
    around each measured block, so GPU times are device times, not launch times.
    fn runs with torch's current thread count (Timer's own default is one
    thread), the count the header states."""
    fn()  # warm-up (and any lazy initialisation)
    if device == "cuda":
        torch.cuda.synchronize()
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare_rounds(fns, device: str, rounds: int = 5, min_run_time: float = 0.3):
    """Times of several functions measured in alternating rounds, so that a slow
    spell of a shared machine hits all of them alike: per function, the list of
    its per-round median times."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            times[k].append(median_seconds(fn, device, min_run_time))
    return times


def cpu_matmul_seconds(dtype: torch.dtype = torch.float16) -> float:
    """Seconds of torch's CPU matmul at 1024^3 in a 16-bit dtype (the second of
    two calls): milliseconds where oneDNN runs it (float16: AVX512-FP16 or
    AMX-FP16; bfloat16: AVX-512 CPUs), seconds where ATen's scalar fallback
    does (float16 elsewhere; both on an AVX2-only CPU)."""
    h = torch.randn(1024, 1024).to(dtype)
    for _ in range(2):
        t0 = time.perf_counter()
        torch.matmul(h, h)
        t = time.perf_counter() - t0
    return t


def median(values):
    return sorted(values)[len(values) // 2]


def compare_seconds(fns, device: str, rounds: int = 5, min_run_time: float = 0.3):
    """Median times of several functions measured in alternating rounds (compare_rounds)."""
    return [median(t) for t in compare_rounds(fns, device, rounds, min_run_time)]


def torch_unscale_check_(tensors, found_inf, inv_scale):
    """The strongest torch baseline for "multiply by inv_scale and flag non-finite values":
    torch._amp_foreach_non_finite_check_and_unscale_ (GradScaler's fused kernel) for every
    tensor it accepts. Its CUDA kernel rejects bfloat16, so bfloat16 tensors on a GPU take
    the eager composition a user would write instead: a max-abs reduction per tensor
    (torch._foreach_norm with ord=inf), one flag from their stack, one foreach multiply.
    That is one read for the check plus one read-write for the multiply."""
    fused = [t for t in tensors if not (t.is_cuda and t.dtype == torch.bfloat16)]
    eager = [t for t in tensors if t.is_cuda and t.dtype == torch.bfloat16]
    if fused:
        torch._amp_foreach_non_finite_check_and_unscale_(fused, found_inf, inv_scale)
    if eager:
        amax = torch.stack(torch._foreach_norm(eager, float("inf")))
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(amax)).any().to(found_inf.dtype)))
        torch._foreach_mul_(eager, inv_scale.reshape(()))


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_path(name: str, device: str, out=None) -> Path:
    """benchmarks/results/<name>_<device class>.md, or `out` for an ad-hoc run:
    a file path, or an existing folder to write the canonical name into."""
    filename = f"{name}_{device_class(device)}.md"
    if out is None:
        return RESULTS_DIR / filename
    out = Path(out)
    return out / filename if out.is_dir() else out


def write_results(name: str, device: str, text: str, out=None) -> Path:
    path = results_path(name, device, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
