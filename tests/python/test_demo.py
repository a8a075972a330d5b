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
OPTIONAL_ROWS = ("mfu", "time_to_baseline_loss_s", "cost_to_baseline_loss_usd")


def run_demo(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "deepseek_ext.demo", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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
    bf16 = Recipe.low_cost(amp_dtype="bfloat16")
    assert bf16.compute_dtype("cuda") == torch.bfloat16 and bf16.precision_label("cuda") == "bf16 autocast"
    assert not bf16.make_scaler("cpu").is_enabled() and bf16.compute_dtype("cpu") == torch.float32
    with pytest.raises(ValueError, match="amp_dtype"):
        Recipe(amp_dtype="float8")
    # Progressive training with nothing to grow is refused before any step runs.
    with pytest.raises(ValueError, match="has none to grow"):
        Recipe.low_cost().make_schedule(10, ModelConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, d_ff=16,
                                                        max_seq_len=8))


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
            if key in OPTIONAL_ROWS:
                assert run.get(key) is None, key  # MFU is for GPUs; time to loss needs --eval-every
                continue
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
    assert low["hook_stats"]["compressed_calls"] > 0  # the recipe's int8 path, not the policy's plain one
    assert "final eval loss" in report["table"] and "machine" in report
    assert (out / "loss_curves.png").is_file()
    # The results file: a header naming date, machine, torch and commit, then the table.
    results = (tmp_path / "results" / "demo_cpu.md").read_text()
    for field in ("- date: ", "- machine: ", f"- torch: {torch.__version__}", "- commit: ", "--smoke"):
        assert field in results, field
    assert report["table"].strip() in results
    assert (tmp_path / "results" / "demo_cpu_loss_curves.png").is_file()


@pytest.mark.parametrize("model", ["hf-gpt2", "hf-llama"])
def test_demo_on_hugging_face_models(tmp_path, model):
    """--model hf-*: a Hugging Face model (built in code) that the low-cost run
    converts with Recipe.apply; the same report, its own results file."""
    run_demo("--smoke", "--model", model, "--out", tmp_path / "demo", "--results-dir", tmp_path / "results")
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    base, low = report["runs"]
    assert report["config"]["model"] == model
    assert low["parameters"] < base["parameters"]
    assert low["ffn_flops_per_token"] < 0.5 * base["ffn_flops_per_token"]
    assert low["bytes_communicated"] < base["bytes_communicated"]
    assert all(math.isfinite(r["eval_loss"]) for r in (base, low))
    results = (tmp_path / "results" / f"demo_{model}_cpu.md").read_text()
    assert f"({model}, converted by Recipe.apply)" in results and report["table"].strip() in results


def test_gpu_preset_runs_tiny_on_the_cpu(tmp_path):
    """The GPU preset's code path (model class, recipe switches, bf16 baseline, the
    fp16 row, evaluation during training, time to the baseline's loss) at a size
    CI runs: what the one GPU call would fail on fails here first."""
    from deepseek_ext.demo._config import GPT2_SMALL, GPT2_SMALL_TINY

    sizes = {"d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "steps", "warmup_steps",
             "eval_windows", "eval_every", "train_corpus_mb", "num_workers", "preset"}
    assert {k for k in GPT2_SMALL if GPT2_SMALL[k] != GPT2_SMALL_TINY[k]} <= sizes
    assert GPT2_SMALL["n_layers"] == 12 and GPT2_SMALL["d_model"] == 768 and GPT2_SMALL["seq_len"] == 1024
    run_demo("--preset", "gpt2-small-tiny", "--out", tmp_path / "demo", "--results-dir", tmp_path / "results")
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    names = [r["name"] for r in report["runs"]]
    assert names == ["baseline", "low-cost", "low-cost fp16"]
    base = report["runs"][0]
    assert base["recipe"] == ["mixed_precision"]  # the baseline is in mixed precision too (bf16 on a GPU)
    for r in report["runs"]:
        steps = [p[0] for p in r["eval_curve"]]
        assert steps == [4, 8, 12], steps
        times = [p[1] for p in r["eval_curve"]]
        assert times == sorted(times) and abs(times[-1] - r["train_s"]) < 1e-9
        assert r["model_flops_per_token"] > 0 and r["mfu"] is None  # no GPU peak on a CPU
    assert base["time_to_baseline_loss_s"] == base["train_s"]
    assert "time to the baseline's final eval loss" in report["table"]
    assert (tmp_path / "results" / "demo_gpt2-small-tiny_cpu.md").is_file()
