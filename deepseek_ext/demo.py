"""The main job: train a small GPT-style language model twice and compare the cost.

    python -m deepseek_ext.demo             # baseline vs low-cost recipe (about 10 min on 2 CPU cores)
    python -m deepseek_ext.demo --ablate    # ... and every technique alone against the baseline
    python -m deepseek_ext.demo --smoke     # a tiny configuration (well under a minute)
    python -m deepseek_ext.demo --device cuda

Both runs train on the same real text (the Python standard library's source
files, byte-level tokens: nothing to download), with the same token budget, in
``--world-size`` processes joined by torch.distributed (Gloo on CPU, NCCL on
CUDA) and DDP. The baseline is fp32, dense FFN, unshared attention, DDP's plain
allreduce and a naive data loader that reads and tokenises text per sample; the
low-cost run turns on every technique of :class:`deepseek_ext.recipe.Recipe`.
The report (``report.json``), each run's monitor output (JSONL, TensorBoard
events, PNG plots) and a loss-curve comparison go to ``runs/demo-<timestamp>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import socket
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from deepseek_ext.recipe import TECHNIQUES, ModelConfig, Recipe

__all__ = ["DemoConfig", "main", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    device: str = "cpu"
    world_size: int = 2
    steps: int = 240
    batch_size: int = 16  # sequences per rank and step
    seq_len: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_windows: int = 128
    train_corpus_mb: float = 4.0
    num_workers: int = 1  # DataLoader workers per rank, the same for both runs
    price_per_device_hour: float = 0.05  # USD; CPU: one process = one device (a cloud vCPU pair is ~$0.05-0.10/h)
    seed: int = 0

    def model(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=self.d_ff, max_seq_len=self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.world_size * self.batch_size * self.seq_len


SMOKE = dict(steps=12, batch_size=4, seq_len=32, d_model=64, n_layers=4, n_heads=2, d_ff=256, warmup_steps=2,
             eval_windows=8, train_corpus_mb=0.3, num_workers=0)
CUDA_DEFAULTS = dict(steps=600, batch_size=32, seq_len=512, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                     lr=1e-3, warmup_steps=60, train_corpus_mb=48.0, num_workers=2, price_per_device_hour=3.0,
                     eval_windows=256)


# -- the corpus: real text that every Python installation has --------------------
def demo_corpus(train_bytes: float, eval_bytes: float = 256e3) -> Tuple[List[str], List[str]]:
    """Standard-library ``.py`` files in sorted order: every 20th file is held out
    for evaluation; the others are taken until ``train_bytes`` is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no Python source files under {root}: the demo needs the standard library's sources")
    # Held out: every 20th file of the whole library, taken in a fixed random order
    # until eval_bytes; training: the other files in sorted order until train_bytes.
    candidates = files[::20]
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(1234)).tolist()
    held_out, n_eval = [], 0
    for i in order:
        if n_eval >= eval_bytes:
            break
        held_out.append(str(candidates[i]))
        n_eval += candidates[i].stat().st_size
    train, n_train = [], 0
    for i, p in enumerate(files):
        if n_train >= train_bytes:
            break
        if i % 20:
            train.append(str(p))
            n_train += p.stat().st_size
    return train, sorted(held_out)


# -- one training run, in each of world_size processes ----------------------------------
class _IndexBatches:
    """Infinite batches of window indices for one rank (one batch per training step).

    The windows are put in one fixed random order; batch ``k`` draws from the first
    ``fraction_at(k)`` of that order (progressive training's data fraction, which
    only grows), reshuffled every pass and strided over ranks. Everything follows
    from the seed and the batch counter: identical on every rank and run, whatever
    the loader's prefetch depth."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, fraction_at=lambda k: 1.0):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.fraction_at = seed, fraction_at

    def _active(self, k: int) -> int:
        return min(self.n, max(self.world * self.batch_size, int(self.n * min(1.0, self.fraction_at(k)))))

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        k, epoch = 0, 0
        while True:
            active = self._active(k)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            mine = perm[:active][torch.randperm(active, generator=g)][self.rank::self.world]
            for i in range(0, len(mine) - self.batch_size + 1, self.batch_size):
                yield mine[i:i + self.batch_size].tolist()
                k += 1
                if self._active(k) > active:
                    break  # the fraction grew: draw from the larger set now
            epoch += 1


class _LateValue:
    """A device scalar shown one interval late: a non-blocking copy to the host, read
    when the next one starts, so progress display never waits for the device."""

    def __init__(self):
        self._pending = None  # (host tensor, CUDA event or None)
        self.value = float("nan")

    def push(self, t: torch.Tensor) -> float:
        if self._pending is not None:
            host, event = self._pending
            if event is None or event.query():  # never wait: keep the old value if not there yet
                self.value = float(host)
                self._pending = None
        if self._pending is None:
            host = torch.empty((), dtype=torch.float32, pin_memory=t.is_cuda)
            host.copy_(t.detach().float(), non_blocking=True)
            event = None
            if t.is_cuda:
                event = torch.cuda.Event()
                event.record()
            self._pending = (host, event)
        return self.value


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _unique_params(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return list(model.parameters())  # parameters() yields a shared Parameter once


@torch.no_grad()
def _evaluate(model, eval_ds, cfg: DemoConfig, recipe: Recipe, device) -> float:
    model.eval()
    n = min(cfg.eval_windows, len(eval_ds))
    picks = torch.linspace(0, len(eval_ds) - 1, n).round().long().tolist()  # spread over every file
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, n, 16):
        xs, ys = zip(*(eval_ds[j] for j in picks[i:i + 16]))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        with recipe.autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum")
        total += loss.double()
        count += y.numel()
    model.train()
    return float(total) / max(1, count)


def _worker(rank: int, name: str, recipe: Recipe, cfg: DemoConfig, run_dir: str, data: Dict[str, object],
            port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deepseek_ext.data import MemmapTokenDataset, NaiveTextDataset, Prefetcher
    from deepseek_ext.train import Monitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = cfg.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=cfg.world_size,
                            timeout=datetime.timedelta(minutes=10))
    try:
        device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        mcfg = cfg.model(int(data["vocab_size"]))
        schedule = recipe.make_schedule(cfg.steps, mcfg)
        model = recipe.build_model(mcfg, n_layers=recipe.start_layers(mcfg)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95),
                                fused=cuda or None)
        scaler = recipe.make_scaler(device)

        comm_state = None

        def wrap(m, first: bool):
            # All ranks grow and freeze identically: no re-broadcast of the weights on a re-wrap.
            nonlocal comm_state
            ddp = DDP(m, device_ids=[device.index] if cuda else None, init_sync=first)
            comm_state = recipe.register_comm_hook(ddp, state=comm_state)
            return ddp

        ddp = wrap(model, first=True)

        # Data: the same files either way. The memory-mapped token file's windows run across
        # file boundaries (an end-of-text token between files); the naive loader's stay in one
        # file. Evaluation uses per-file windows for both runs.
        fraction_at = lambda k: 1.0  # noqa: E731
        if schedule is not None:
            probe = recipe.make_schedule(cfg.steps, mcfg)  # the same schedule, queried by step

            def fraction_at(k: int) -> float:
                probe.on_step(k)
                return probe.data_fraction()
        if recipe.data_pipeline:
            train_ds = MemmapTokenDataset(data["train_bin"], cfg.seq_len)
        else:
            train_ds = NaiveTextDataset(data["train_files"], cfg.seq_len)
        batches = _IndexBatches(len(train_ds), cfg.batch_size, rank, cfg.world_size, cfg.seed, fraction_at)
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches, num_workers=cfg.num_workers,
                                             pin_memory=cuda, persistent_workers=cfg.num_workers > 0)
        if recipe.data_pipeline:
            stream = iter(Prefetcher(loader, device))
        else:
            stream = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

        monitor = None
        if rank == 0:
            monitor = Monitor(run_dir, price_per_device_hour=cfg.price_per_device_hour, device=device,
                              num_devices=cfg.world_size, tensorboard=True)
            monitor.start()
        bar = None
        if rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=f"{name:>9}", unit="step", dynamic_ncols=True, file=sys.stdout)
        shown = _LateValue()

        losses: List[torch.Tensor] = []
        data_wait = 0.0
        phase = schedule.phase if schedule is not None else None
        dist.barrier()
        t_start = time.perf_counter()
        for step in range(cfg.steps):
            if step == 1:  # step 0 (worker start-up, lazy initialisation) is not timed
                if cuda:
                    torch.cuda.synchronize()
                t_start, data_wait = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            with monitor.data_wait() if monitor is not None else contextlib.nullcontext():
                x, y = next(stream)
            waited = time.perf_counter() - t0
            data_wait += waited
            lr = _lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with recipe.autocast(device):
                logits = ddp(x)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         y.reshape(-1))
                aux = recipe.aux_loss(model)
            total = loss if aux is None else loss + aux
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
            if schedule is not None:
                schedule.on_step(step + 1)
                grew = schedule.maybe_grow(model, opt)
                if grew or schedule.phase != phase:
                    phase = schedule.phase
                    ddp = wrap(model, first=False)  # DDP's parameter list is fixed at construction
            if monitor is not None:
                monitor.log(step, loss=loss.detach(), lr=lr, data_wait_s=waited,
                            tokens=cfg.tokens_per_step, loss_scale=scaler.get_scale_tensor()
                            if scaler.is_enabled() else 1.0)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 and not math.isnan(shown.push(loss)):
                    bar.set_postfix(loss=f"{shown.value:.3f}", refresh=False)
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t_start
        if bar is not None:
            bar.close()

        # -- the report (outside the training loop: syncs are fine here) --------------
        peak_mem = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()  # before eval
        sums = torch.tensor([float(comm_state.stats()["bytes_sent"]), data_wait, train_s], dtype=torch.float64,
                            device=device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        eval_loss = None
        if rank == 0:
            # Windows inside each held-out file (no end-of-text token, no cross-file context):
            # what both runs' models can be judged on alike.
            eval_ds = NaiveTextDataset(data["eval_files"], cfg.seq_len)
            eval_loss = _evaluate(model, eval_ds, cfg, recipe, device)
            params = _unique_params(model)
            n_params = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            result = dict(
                name=name, recipe=recipe.enabled(), precision=recipe.precision_label(device),
                parameters=n_params, trainable_parameters_at_end=trainable,
                param_grad_adam_bytes=4 * n_params * 4,
                ffn_flops_per_token=recipe.ffn_flops_per_token(mcfg),
                tokens=cfg.steps * cfg.tokens_per_step, train_s=train_s,
                tokens_per_s=(cfg.steps - 1) * cfg.tokens_per_step / train_s,  # steps 1.. (step 0 untimed)
                peak_memory_bytes=int(peak_mem),
                bytes_communicated=float(sums[0]),
                data_wait_fraction=float(sums[1] / sums[2]),
                eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss),
                train_loss_curve=[float(v) for v in torch.stack(losses).cpu()],
                hook_stats=comm_state.stats(),
            )
            monitor.close()
            result["monitor"] = {k: v for k, v in monitor.summary().items() if _is_plain(v)}
            result["plots"] = [str(p) for p in monitor.plot()]
            Path(run_dir, "result.json").write_text(json.dumps(result, indent=2, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a spawned worker
    is forked from the launcher before exec, and ru_maxrss keeps the launcher's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_plain(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, dict))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, recipe: Recipe, cfg: DemoConfig, out: Path, data: Dict[str, object]) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.multiprocessing.start_processes(_worker, args=(name, recipe, cfg, str(run_dir), data, _free_port()),
                                          nprocs=cfg.world_size, start_method="spawn")
    result = json.loads((run_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    # The cost of the training itself (start-up, data preparation and evaluation are
    # the same for every run and are in wall_s).
    result["estimated_cost_usd"] = result["train_s"] / 3600 * cfg.world_size * cfg.price_per_device_hour
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# -- the report ----------------------------------------------------------------------
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


def _plot_losses(results: List[dict], path: Path) -> Optional[Path]:
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


def _machine(cfg: DemoConfig) -> str:
    if cfg.device == "cuda":
        dev = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:
        model = platform.processor() or "cpu"
        try:
            model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        dev = f"{model}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}"


def run_demo(cfg: DemoConfig, out: Path, ablate: bool = False) -> dict:
    from deepseek_ext.data import build_token_dataset

    # glibc raises its mmap threshold as large blocks are freed, after which the
    # sparse FFN's per-step buffers of varying size fragment the heap: resident
    # memory creeps up by hundreds of MiB over a run (measured: 1.19 GB after 80
    # steps vs 0.73 GB with a fixed threshold). A fixed threshold, the same for
    # every run, keeps peak memory a measure of what the model needs.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    out.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = demo_corpus(cfg.train_corpus_mb * 1e6,
                                          eval_bytes=max(256e3, cfg.eval_windows * cfg.seq_len * 1.1))
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    train_info = build_token_dataset(train_files, data_dir / "train.bin", tokenizer="byte", overwrite=True)
    eval_info = build_token_dataset(eval_files, data_dir / "eval.bin", tokenizer="byte", overwrite=True)
    data = dict(vocab_size=max(train_info.vocab_size, eval_info.vocab_size), train_files=train_files,
                eval_files=eval_files, train_bin=str(data_dir / "train.bin"), eval_bin=str(data_dir / "eval.bin"))
    print(f"corpus: {len(train_files)} stdlib files for training ({_tokens(train_info):,} byte tokens), "
          f"{len(eval_files)} held-out files for evaluation ({_tokens(eval_info):,} tokens)")
    print(f"budget: {cfg.steps} steps x {cfg.tokens_per_step:,} tokens = {cfg.steps * cfg.tokens_per_step:,} "
          f"tokens per run, {cfg.world_size} processes ({'NCCL' if cfg.device == 'cuda' else 'Gloo'})")

    runs = [("baseline", Recipe.baseline()), ("low-cost", Recipe.low_cost())]
    if ablate:
        for t in TECHNIQUES:
            if t == "mixed_precision" and cfg.device != "cuda":
                print("ablate: mixed_precision skipped on CPU (fp32 either way; see Recipe)")
                continue
            runs.append((f"+{t}", Recipe.only(t)))
    results = []
    for name, recipe in runs:
        results.append(run_one(name.replace("+", "only-"), recipe, cfg, out, data))
        results[-1]["name"] = name
    main_table = comparison_table(results[:2])
    report = dict(machine=_machine(cfg), config=asdict(cfg), runs=results, table=main_table)
    print()
    print(f"machine: {report['machine']}")
    print(main_table)
    if ablate:
        report["ablate_table"] = comparison_table([results[0]] + results[2:])
        print("ablation (each technique alone vs the baseline):")
        print(report["ablate_table"])
    plot = _plot_losses(results[:2], out / "loss_curves.png")
    if plot:
        report["comparison_plot"] = str(plot)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(f"machine: {report['machine']}\n\n{main_table}\n"
                                   + (f"\nablation:\n\n{report['ablate_table']}" if ablate else ""))
    print(f"report, plots and monitor logs: {out}/")
    return report


def _tokens(info) -> int:
    for key in ("num_tokens", "n_tokens", "tokens"):
        if hasattr(info, key):
            return int(getattr(info, key))
    return -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepseek_ext.demo", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration for tests (well under a minute)")
    p.add_argument("--ablate", action="store_true", help="also run each technique alone against the baseline")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo-<timestamp>)")
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--price-per-device-hour", type=float, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cfg = DemoConfig(device=args.device)
    if args.device == "cuda":
        cfg = replace(cfg, **CUDA_DEFAULTS, world_size=torch.cuda.device_count())
    if args.smoke:
        cfg = replace(cfg, **SMOKE)
    for key in ("world_size", "steps", "price_per_device_hour"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    if cfg.world_size < 1:
        p.error(f"--world-size must be >= 1, got {cfg.world_size}")
    if cfg.device == "cuda" and cfg.world_size > torch.cuda.device_count():
        p.error(f"--world-size {cfg.world_size}: only {torch.cuda.device_count()} CUDA device(s); NCCL needs one per rank")
    if cfg.world_size == 1:
        print("note: world size 1 communicates nothing; bytes communicated will be 0 for both runs")
    if cfg.steps < 2:
        p.error(f"--steps must be >= 2 (step 0 is not timed), got {cfg.steps}")
    out = args.out or Path("runs") / f"demo-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    run_demo(cfg, out, ablate=args.ablate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
