"""One training run of the demo, in each of ``world_size`` processes joined by
torch.distributed (Gloo on CPU, NCCL on CUDA) and DDP."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from deepseek_ext.recipe import Recipe

from deepseek_ext._provenance import gpu_class
from deepseek_ext.demo._config import BF16_PEAK_FLOPS, DemoConfig
from deepseek_ext.demo._models import build_model, ffn_flops_per_token, model_flops_per_token


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
        mcfg = cfg.model_config(int(data["vocab_size"]))
        schedule = recipe.make_schedule(cfg.steps, mcfg)
        model = build_model(cfg.model, recipe, mcfg, n_layers=recipe.start_layers(mcfg)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95),
                                fused=cuda or None)
        scaler = recipe.make_scaler(device)

        comm_state = None

        def wrap(m, first: bool):
            # All ranks grow and freeze identically: no re-broadcast of the weights on a re-wrap.
            nonlocal comm_state
            ddp = DDP(m, device_ids=[device.index] if cuda else None, init_sync=first)
            # The demo's ranks share one machine, where the hook's "auto" policy would
            # send every bucket plain (loopback outruns int8's compute): "always" makes
            # the run send what the recipe sends between hosts, and on one rank (the
            # GPU preset) still runs the int8 path.
            kw = {"policy": "always"} if recipe.int8_comm and comm_state is None else {}
            comm_state = recipe.register_comm_hook(ddp, state=comm_state, **kw)
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
        eval_ds = NaiveTextDataset(data["eval_files"], cfg.seq_len) if rank == 0 else None
        eval_curve: List[List[float]] = []  # [step, training seconds so far, eval loss]
        eval_s = 0.0
        data_wait = 0.0
        phase = schedule.phase if schedule is not None else None
        dist.barrier()
        t_start = time.perf_counter()
        for step in range(cfg.steps):
            if step == 1:  # step 0 (worker start-up, lazy initialisation) is not timed
                if cuda:
                    torch.cuda.synchronize()
                t_start, data_wait, eval_s = time.perf_counter(), 0.0, 0.0
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
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and 1 <= step < cfg.steps - 1:
                # Evaluation time is not training time: it is taken out of train_s.
                if cuda:
                    torch.cuda.synchronize()
                te = time.perf_counter()
                if rank == 0:
                    ev = _evaluate(model, eval_ds, cfg, recipe, device)
                    eval_curve.append([step + 1, te - t_start - eval_s, ev])
                dist.barrier()
                eval_s += time.perf_counter() - te
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 and not math.isnan(shown.push(loss)):
                    bar.set_postfix(loss=f"{shown.value:.3f}", refresh=False)
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t_start - eval_s
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
            eval_loss = _evaluate(model, eval_ds, cfg, recipe, device)
            eval_curve.append([cfg.steps, train_s, eval_loss])
            params = _unique_params(model)
            n_params = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            result = dict(
                name=name, recipe=recipe.enabled(), precision=recipe.precision_label(device),
                parameters=n_params, trainable_parameters_at_end=trainable,
                param_grad_adam_bytes=4 * n_params * 4,
                ffn_flops_per_token=ffn_flops_per_token(cfg.model, recipe, mcfg, model),
                model_flops_per_token=model_flops_per_token(mcfg, ffn_flops_per_token(cfg.model, recipe, mcfg, model)),
                eval_curve=eval_curve,
                mfu=_mfu(cfg, (cfg.steps - 1) * cfg.tokens_per_step / train_s,
                         model_flops_per_token(mcfg, ffn_flops_per_token(cfg.model, recipe, mcfg, model))),
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


def _mfu(cfg: DemoConfig, tokens_per_s: float, flops_per_token: int) -> Optional[float]:
    """Model FLOPs utilisation against the GPUs' dense bf16 peak (None on a CPU or
    an unlisted GPU)."""
    if cfg.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    cls = gpu_class(name)
    peak = BF16_PEAK_FLOPS.get(f"{cls} pcie" if "pcie" in name.lower() else cls, BF16_PEAK_FLOPS.get(cls))
    return tokens_per_s * flops_per_token / (peak * cfg.world_size) if peak else None


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
