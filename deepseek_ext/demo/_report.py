"""The demo's report: the comparison table, the loss-curve plot, the machine line."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from deepseek_ext._provenance import cpu_model, git_commit, gpu_class
from deepseek_ext.demo._config import DemoConfig


ROWS = [  # (label, key, format)
    ("precision", "precision", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("params+grads+Adam state", "param_grad_adam_bytes", "mb"),
    ("FFN FLOPs / token (fwd)", "ffn_flops_per_token", "{:,}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("peak memory (rank 0)", "peak_memory_bytes", "mb"),
    ("bytes communicated", "bytes_communicated", "mb"),
    ("data-wait fraction", "data_wait_fraction", "{:.1%}"),
    ("final eval loss", "eval_loss", "{:.4f}"),
    ("eval perplexity", "eval_perplexity", "{:.3f}"),
    ("model FLOPs utilisation (bf16 peak)", "mfu", "{:.1%}"),
    ("training time", "train_s", "{:.1f} s"),
    ("time to the baseline's final eval loss", "time_to_baseline_loss_s", "{:.1f} s"),
    ("wall time (with start-up, eval)", "wall_s", "{:.1f} s"),
    ("estimated training cost", "estimated_cost_usd", "${:.5f}"),
    ("cost to the baseline's final eval loss", "cost_to_baseline_loss_usd", "${:.5f}"),
]


def _fmt(fmt: str, v) -> str:
    if v is None:
        return "n/a"
    if fmt == "mb":
        return f"{v / 2**20:,.2f} MiB"
    return fmt.format(v)


def add_time_to_baseline_loss(results: List[dict]) -> None:
    """Each run's training time until its eval loss first reached the baseline's
    final one (the first run is the baseline): ``time_to_baseline_loss_s``, None
    where it never did, and the cost of that time."""
    target = results[0]["eval_loss"]
    for r in results:
        reached = [t for step, t, loss in r.get("eval_curve", []) if loss <= target]
        r["time_to_baseline_loss_s"] = min(reached) if reached else None
        r["cost_to_baseline_loss_usd"] = (r["time_to_baseline_loss_s"] * r["estimated_cost_usd"] / r["train_s"]
                                          if reached and r["train_s"] else None)


def comparison_table(results: List[dict]) -> str:
    base = results[0]
    cols = ["metric"] + [r["name"] for r in results] + [f"{r['name']} / {base['name']}" for r in results[1:]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, key, fmt in ROWS:
        if all(r.get(key) is None for r in results):
            continue  # MFU on a CPU, time to the baseline's loss without --eval-every
        cells = [label] + [_fmt(fmt, r.get(key)) for r in results]
        for r in results[1:]:
            a, b = r.get(key), base.get(key)
            cells.append(f"{a / b:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                         else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(results: List[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        curve = torch.tensor(r["train_loss_curve"])
        k = max(1, len(curve) // 40)
        smooth = torch.nn.functional.avg_pool1d(curve.view(1, 1, -1), k, stride=1).view(-1)
        ax.plot(range(k - 1, len(curve)), smooth.tolist(), label=f"{r['name']} (eval {r['eval_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title("deepseek_ext demo: same tokens, same data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_line(cfg: DemoConfig) -> str:
    if cfg.device == "cuda":
        dev = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:
        dev = f"{cpu_model()}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}"


def device_class(cfg: DemoConfig) -> str:
    """"cpu", or the GPU model in lower case ("NVIDIA H100 80GB HBM3" -> "h100")."""
    return gpu_class(torch.cuda.get_device_name()) if cfg.device == "cuda" else "cpu"


def write_results(report: dict, cfg: DemoConfig, results_dir: Path, plot: Optional[Path], command: str) -> Path:
    """``results_dir/demo[_<preset>][_<model>]_<device class>.md``: the header (date, machine, torch,
    commit, command), the baseline vs low-cost table and, after an ``--ablate``
    run, the ablation; the loss-curve plot beside it. Overwrites both."""
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "_".join(["demo"] + [v for v in (cfg.preset, "" if cfg.model == "gpt" else cfg.model) if v]
                    + [device_class(cfg)])
    budget = cfg.steps * cfg.tokens_per_step
    lines = [
        "# Demo: baseline vs low-cost recipe"
        + ("" if cfg.model == "gpt" else f" ({cfg.model}, converted by Recipe.apply)"),
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {report['machine']}",
        f"- torch: {torch.__version__}",
        f"- commit: {git_commit()}",
        f"- command: {command}",
        f"- budget: {cfg.steps} steps x {cfg.tokens_per_step:,} tokens = {budget:,} tokens per run, "
        f"{cfg.world_size} processes",
        *([f"- preset: {cfg.preset} (d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
           f"d_ff {cfg.d_ff}, context {cfg.seq_len}); MFU against the GPU's dense bf16 peak"] if cfg.preset else []),
        "",
        report["table"].rstrip(),
    ]
    if plot is not None:
        shutil.copyfile(plot, results_dir / f"{name}_loss_curves.png")
        lines += ["", f"![training loss, baseline vs low-cost]({name}_loss_curves.png)"]
    if "ablate_table" in report:
        lines += ["", "## Each technique alone vs the baseline", "", report["ablate_table"].rstrip()]
    path = results_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
