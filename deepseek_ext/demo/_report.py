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
    ("training time", "train_s", "{:.1f} s"),
    ("wall time (with start-up, eval)", "wall_s", "{:.1f} s"),
    ("estimated training cost", "estimated_cost_usd", "${:.5f}"),
]


def _fmt(fmt: str, v) -> str:
    if fmt == "mb":
        return f"{v / 2**20:,.2f} MiB"
    return fmt.format(v)


def comparison_table(results: List[dict]) -> str:
    base = results[0]
    cols = ["metric"] + [r["name"] for r in results] + [f"{r['name']} / {base['name']}" for r in results[1:]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, key, fmt in ROWS:
        cells = [label] + [_fmt(fmt, r[key]) for r in results]
        for r in results[1:]:
            a, b = r[key], base[key]
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
    """``results_dir/demo_<device class>.md``: the header (date, machine, torch,
    commit, command), the baseline vs low-cost table and, after an ``--ablate``
    run, the ablation; the loss-curve plot beside it. Overwrites both."""
    results_dir.mkdir(parents=True, exist_ok=True)
    name = f"demo_{device_class(cfg)}"
    budget = cfg.steps * cfg.tokens_per_step
    lines = [
        "# Demo: baseline vs low-cost recipe",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {report['machine']}",
        f"- torch: {torch.__version__}",
        f"- commit: {git_commit()}",
        f"- command: {command}",
        f"- budget: {cfg.steps} steps x {cfg.tokens_per_step:,} tokens = {budget:,} tokens per run, "
        f"{cfg.world_size} processes",
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
