"""The demo (python -m deepseek_ext.demo) and the recipe switches it is built on."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_ext.demo import _report as demo_report
from deepseek_ext.demo import _train as demo_train

from deepseek_ext.recipe import TECHNIQUES, ModelConfig, Recipe

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_switches():
    assert Recipe.baseline().enabled() == []
    assert Recipe.low_cost().enabled() == list(TECHNIQUES)
    for t in TECHNIQUES:
        assert Recipe.only(t).enabled() == [t]
    with pytest.raises(ValueError, match="technique must be one of"):
        Recipe.only("magic")
    with pytest.raises(ValueError, match="ffn_density"):
        Recipe(ffn_density=0.0)
    # Mixed precision is a no-op on the CPU and says so.
    assert Recipe.low_cost().compute_dtype("cpu") == torch.float32
    assert "CUDA-only" in Recipe.low_cost().precision_label("cpu")
    assert Recipe.low_cost().compute_dtype("cuda") == torch.float16
    assert Recipe.baseline().compute_dtype("cuda") == torch.float32


def test_recipe_models_differ_where_they_should():
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layers=4, n_heads=2, d_ff=256, max_seq_len=32)
    base = Recipe.baseline().build_model(cfg)
    shared = Recipe.only("shared_attention").build_model(cfg)
    sparse = Recipe.only("sparse_ffn").build_model(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(shared) < n(base)
    assert Recipe.only("sparse_ffn").ffn_flops_per_token(cfg) < Recipe.baseline().ffn_flops_per_token(cfg)
    assert Recipe.only("progressive").start_layers(cfg) == 2 and Recipe.baseline().start_layers(cfg) == 4
    x = torch.randint(0, 256, (2, 16))
    for m in (base, shared, sparse):
        assert m(x).shape == (2, 16, cfg.vocab_size)


def test_index_batches_are_rank_disjoint_and_follow_the_fraction():
    fraction_at = lambda k: 0.25 if k < 3 else 1.0  # noqa: E731
    seen, first = [], []
    for rank in range(2):
        it = iter(demo_train._IndexBatches(100, 4, rank, 2, seed=3, fraction_at=fraction_at))
        batches = [next(it) for _ in range(3)]  # 3 batches x 4 = 12 of the rank's 12 or 13 windows
        seen.append({i for b in batches for i in b})
        first.append(batches)
        assert all(len(b) == 4 for b in batches)
        later = {i for _ in range(20) for i in next(it)}
        assert len(later) > 25  # the fraction grew at batch 3
    assert not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) == 24  # 24 distinct windows of the active 25
    # Deterministic: the same batches again.
    again = iter(demo_train._IndexBatches(100, 4, 0, 2, seed=3, fraction_at=fraction_at))
    assert [next(again) for _ in range(3)] == first[0]


def test_comparison_table_has_ratios():
    a = {k: 2.0 for _, k, _ in demo_report.ROWS}
    b = {k: 1.0 for _, k, _ in demo_report.ROWS}
    a.update(name="baseline", precision="fp32")
    b.update(name="low-cost", precision="fp32")
    table = demo_report.comparison_table([a, b])
    assert "| tokens/s | 2 | 1 | 0.500x |" in table
    assert table.count("\n") == len(demo_report.ROWS) + 2


def test_demo_smoke_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "deepseek_ext.demo", "--smoke", "--out", str(out),
                           "--results-dir", str(tmp_path / "results")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["baseline", "low-cost"]
    for run in report["runs"]:
        for _, key, _ in demo_report.ROWS:
            assert key in run, f"{run['name']} lacks {key}"
            if key != "precision":
                assert math.isfinite(float(run[key])), f"{run['name']}.{key} = {run[key]}"
        assert run["bytes_communicated"] > 0
        assert all(math.isfinite(v) for v in run["train_loss_curve"])
        assert all(Path(p).is_file() for p in run["plots"])
        assert (out / run["name"] / "result.json").is_file()
    base, low = report["runs"]
    assert low["parameters"] < base["parameters"]
    assert low["ffn_flops_per_token"] < base["ffn_flops_per_token"]
    assert low["bytes_communicated"] < base["bytes_communicated"]
    assert "final eval loss" in report["table"] and "machine" in report
    assert (out / "loss_curves.png").is_file()
    # The results file: a header naming date, machine, torch and commit, then the table.
    results = (tmp_path / "results" / "demo_cpu.md").read_text()
    for field in ("- date: ", "- machine: ", f"- torch: {torch.__version__}", "- commit: ", "--smoke"):
        assert field in results, field
    assert report["table"].strip() in results
    assert (tmp_path / "results" / "demo_cpu_loss_curves.png").is_file()
