"""The benchmarks' shared helpers (benchmarks/common.py): timing, table header, results file."""

import importlib.util
import os

import torch

# benchmarks/common.py needs torch only: the test runs without the compiled library.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmarks_common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(_ROOT, "benchmarks", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_seconds_times_with_the_callers_thread_count():
    # torch.utils.benchmark.Timer runs its statement on one thread unless told
    # otherwise; the tables' headers state torch's thread count.
    common = _benchmarks_common()
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    seen = []
    try:
        common.median_seconds(lambda: seen.append(torch.get_num_threads()), "cpu", min_run_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before


def test_header_names_date_machine_torch_and_commit(monkeypatch):
    common = _benchmarks_common()
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")
    lines = common.header("A title", "cpu").splitlines()
    assert lines[0] == "# A title"
    fields = dict(line[2:].split(": ", 1) for line in lines if line.startswith("- "))
    assert set(fields) == {"date", "machine", "torch", "commit"}
    assert fields["date"].endswith(" UTC")
    assert f"{torch.get_num_threads()} threads" in fields["machine"]
    assert fields["torch"] == torch.__version__
    assert fields["commit"] == "abc1234"


def test_commit_is_the_checkouts_short_hash(monkeypatch):
    common = _benchmarks_common()
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    commit = common.commit()
    if not os.path.exists(os.path.join(_ROOT, ".git")):  # a worktree has a .git file
        assert commit.startswith("unknown")
    else:
        head = commit.split()[0]
        assert 7 <= len(head) <= 12 and all(c in "0123456789abcdef" for c in head), commit


def test_gpu_class_is_the_model_in_lower_case():
    common = _benchmarks_common()
    assert common.gpu_class("NVIDIA H200") == "h200"
    assert common.gpu_class("NVIDIA H100 80GB HBM3") == "h100"
    assert common.gpu_class("NVIDIA A100-SXM4-40GB") == "a100"
    assert common.gpu_class("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert common.device_class("cpu") == "cpu"


def test_write_results_writes_one_markdown_file_per_benchmark_and_device_class(tmp_path, monkeypatch):
    common = _benchmarks_common()
    assert common.results_path("gemm", "cpu") == common.RESULTS_DIR / "gemm_cpu.md"
    assert common.RESULTS_DIR.parts[-2:] == ("benchmarks", "results")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    first = common.write_results("gemm", "cpu", "first\n")
    second = common.write_results("gemm", "cpu", "second\n")
    assert first == second == tmp_path / "gemm_cpu.md"
    assert first.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemm_cpu.md"]
    # --out: a file path as given, or a folder to write the canonical name into.
    adhoc = tmp_path / "adhoc" / "gemm_try.md"
    assert common.write_results("gemm", "cpu", "x\n", adhoc) == adhoc and adhoc.read_text() == "x\n"
    assert common.write_results("gemm", "cpu", "y\n", tmp_path / "adhoc") == tmp_path / "adhoc" / "gemm_cpu.md"
