"""Training monitor: resource sampling, training metrics, running cost, in the
ecosystem's formats (JSONL, TensorBoard event files, PNG plots).

    with Monitor("runs/exp1", price_per_device_hour=2.5, device="cuda") as mon:
        for step, batch in enumerate(mon.timed(loader)):   # data wait is timed
            loss = train_step(batch)
            mon.log(step, loss=loss, tokens=batch[0].numel())  # loss may stay on the GPU
    print(mon.summary()); mon.plot()

``log`` never synchronises the host with the device: device tensors are
stacked into one small tensor, copied to pinned host memory with
``non_blocking=True`` and an event is recorded; a background thread turns them
into numbers once their event has completed and writes them out. The same
thread samples, every ``sample_interval_s``: system and process CPU use,
process memory (RSS), I/O wait, process disk I/O, and on CUDA the GPU's
utilisation, memory and power through NVML (``nvidia-ml-py``) plus the memory
torch's allocator holds.

Files in ``out_dir``: ``metrics.jsonl`` (one line per ``log`` call: step, time,
metrics, derived ``tokens_per_s`` / ``samples_per_s`` when ``tokens`` / ``samples``
are logged, ``cost``), ``system.jsonl`` (one line per sample), TensorBoard
``events.out.tfevents.*`` (``train/*`` and ``system/*`` scalars), ``summary.json``
(at close) and ``*.png`` from ``plot()``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import resource
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional

import psutil
import torch


class _Nvml:
    """NVML for one torch CUDA device, or nothing when NVML is unavailable."""

    def __init__(self, device: torch.device):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            props = torch.cuda.get_device_properties(device)
            try:
                bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as e:  # no driver / library: GPU fields are left out
            self.error = f"{type(e).__name__}: {e}"

    def sample(self) -> dict:
        if self.handle is None:
            return {}
        nv, h, out = self.nv, self.handle, {}
        with contextlib.suppress(Exception):
            u = nv.nvmlDeviceGetUtilizationRates(h)
            out["gpu_util_percent"] = float(u.gpu)
            out["gpu_mem_util_percent"] = float(u.memory)
        with contextlib.suppress(Exception):
            out["gpu_mem_used_mb"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
        with contextlib.suppress(Exception):
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        return out


class Monitor:
    """Background monitor with cost tracking for any training loop.

    Args:
        out_dir: where files are written (created).
        price_per_device_hour: price of one device for one hour (any currency);
            None: no cost estimate.
        device: the training device ("cuda", "cuda:1", "cpu"); GPU sampling on CUDA.
        num_devices: devices billed (cost = hours * price * num_devices).
        sample_interval_s: period of the resource sampler.
        tensorboard: also write TensorBoard event files.
        flush_interval_s: how often the background thread writes pending metrics.
    """

    def __init__(self, out_dir, *, price_per_device_hour: Optional[float] = None, device=None,
                 num_devices: int = 1, sample_interval_s: float = 1.0, tensorboard: bool = True,
                 flush_interval_s: float = 0.5):
        if price_per_device_hour is not None and not price_per_device_hour >= 0:
            raise ValueError(f"price_per_device_hour must be >= 0 or None, got {price_per_device_hour!r}")
        if not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s!r}")
        if not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
        self.out_dir = Path(out_dir)
        self.price = price_per_device_hour
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_devices = num_devices
        self.sample_interval_s = sample_interval_s
        self.flush_interval_s = flush_interval_s
        self.use_tensorboard = tensorboard
        self.records: List[dict] = []   # converted metrics, in order
        self.samples: List[dict] = []   # system samples
        self._pending = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._started = self._closed = False
        self._data_wait_s = 0.0
        self._log_s = 0.0
        self._thread_cpu_s = 0.0
        self._prev = None  # (time, step) of the previous converted record

    # ---- lifecycle
    def start(self) -> "Monitor":
        if self._started:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_f = open(self.out_dir / "metrics.jsonl", "a")
        self._system_f = open(self.out_dir / "system.jsonl", "a")
        self._tb = None
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir))
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        psutil.cpu_times_percent(None)
        self._nvml = _Nvml(self.device) if self.device.type == "cuda" else None
        self.t0 = time.time()
        self._t0_perf = time.perf_counter()
        self._started = True
        self._thread = threading.Thread(target=self._run, daemon=True, name="deepseek_ext-monitor")
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self) -> dict:
        """Stop sampling, write everything pending and summary.json; returns the summary."""
        if not self._started:
            self.start()
        if self._closed:
            return self._summary
        self._stop.set()
        self._thread.join()
        self._sample()
        self._drain(wait=True)
        self._closed = True
        self._summary = self.summary()
        (self.out_dir / "summary.json").write_text(json.dumps(self._summary, indent=1))
        self._metrics_f.close()
        self._system_f.close()
        if self._tb is not None:
            self._tb.close()
        return self._summary

    # ---- the hot path
    def log(self, step: int, **metrics) -> None:
        """Record metrics of a step: Python numbers or tensors (device tensors are
        read later, without a host-device synchronisation). Conventional names:
        loss, lr, tokens (this step's tokens: gives tokens_per_s), samples,
        loss_scale, skipped_steps, compression_ratio, sparsity_load."""
        t0 = time.perf_counter()
        if not self._started:
            self.start()
        host, dev_names, dev_vals = {}, [], []
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"metric {k} must be a scalar, got a tensor of shape {tuple(v.shape)}")
                if v.device.type == "cpu":
                    host[k] = v.item()  # no device involved: read it now
                else:
                    dev_names.append(k)
                    dev_vals.append(v.detach().reshape(()).float())
            elif isinstance(v, (int, float)):
                host[k] = v
            else:
                raise TypeError(f"metric {k} must be a number or a scalar tensor, got {type(v).__name__}")
        copied = event = None
        if dev_vals:
            stacked = torch.stack(dev_vals) if len(dev_vals) > 1 else dev_vals[0].reshape(1)
            if stacked.device.type == "cuda":
                copied = stacked.to("cpu", non_blocking=True)  # lands in pinned memory
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(stacked.device))
            else:  # other devices: no event to wait on, so a plain (synchronous) copy
                copied = stacked.to("cpu")
        self._pending.append((int(step), time.time(), host, dev_names, copied, event))
        self._log_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def data_wait(self):
        """Time the block as data waiting: ``with mon.data_wait(): batch = next(it)``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._data_wait_s += time.perf_counter() - t0

    def timed(self, iterable: Iterable):
        """Yield from iterable, timing each ``next`` as data waiting."""
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self._data_wait_s += time.perf_counter() - t0
                return
            self._data_wait_s += time.perf_counter() - t0
            yield item

    @property
    def data_wait_s(self) -> float:
        """Seconds spent in data_wait() / timed() so far."""
        return self._data_wait_s

    # ---- background work
    def cost(self, at: Optional[float] = None) -> Optional[float]:
        if self.price is None:
            return None
        hours = ((at if at is not None else time.time()) - self.t0) / 3600.0
        return hours * self.price * self.num_devices

    def _run(self):
        c0 = time.thread_time()
        next_sample = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now >= next_sample:
                self._sample()
                next_sample = now + self.sample_interval_s
            self._drain(wait=False)
            self._thread_cpu_s = time.thread_time() - c0
            self._stop.wait(min(self.flush_interval_s, max(0.0, next_sample - time.perf_counter())))
        self._thread_cpu_s = time.thread_time() - c0

    def _sample(self):
        t = time.time()
        s = {"time": t - self.t0, "cpu_percent": psutil.cpu_percent(None),
             "process_cpu_percent": self._proc.cpu_percent(None)}
        with contextlib.suppress(Exception):
            s["rss_mb"] = self._proc.memory_info().rss / 2**20
        with contextlib.suppress(Exception):
            s["iowait_percent"] = getattr(psutil.cpu_times_percent(None), "iowait", 0.0)
        with contextlib.suppress(Exception):
            io = self._proc.io_counters()
            s["read_mb"], s["write_mb"] = io.read_bytes / 2**20, io.write_bytes / 2**20
        if self._nvml is not None:
            s.update(self._nvml.sample())
            with contextlib.suppress(Exception):
                s["torch_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
        if self.price is not None:
            s["cost"] = self.cost(t)
        with self._lock:
            k = len(self.samples)
            self.samples.append(s)
            self._system_f.write(json.dumps(s) + "\n")
            self._system_f.flush()
            if self._tb is not None:
                for name, v in s.items():
                    if name != "time":
                        self._tb.add_scalar(f"system/{name}", v, k, walltime=t)

    def _drain(self, wait: bool):
        with self._lock:
            while self._pending:
                step, t, host, dev_names, copied, event = self._pending[0]
                if event is not None and not event.query():
                    if not wait:
                        break
                    event.synchronize()
                self._pending.popleft()
                rec = {"step": step, "time": t - self.t0}
                rec.update(host)
                if copied is not None:
                    rec.update(zip(dev_names, copied.tolist()))
                if self._prev is not None and t > self._prev:
                    for k in ("tokens", "samples"):
                        if isinstance(rec.get(k), (int, float)):
                            rec[f"{k}_per_s"] = rec[k] / (t - self._prev)
                self._prev = t
                if self.price is not None:
                    rec["cost"] = self.cost(t)
                self.records.append(rec)
                self._metrics_f.write(json.dumps(rec) + "\n")
                if self._tb is not None:
                    for k, v in rec.items():
                        if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                            self._tb.add_scalar(f"train/{k}", v, step, walltime=t)
            self._metrics_f.flush()

    # ---- results
    def flush(self) -> None:
        """Write every pending metric now (waits for the device copies: not for the hot path)."""
        self._drain(wait=True)

    def summary(self) -> dict:
        """Totals so far: wall time, cost, data-wait fraction, resource use, last metrics."""
        if not self._started:
            raise RuntimeError("the monitor has not been started")
        if not self._closed:
            self.flush()
        wall = (self.samples[-1]["time"] if self._closed and self.samples else time.time() - self.t0)
        recs, samples = self.records, self.samples

        def mean(key, rows):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            return sum(vals) / len(vals) if vals else None

        def peak(key, rows):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            return max(vals) if vals else None

        out = {"wall_time_s": wall, "device": str(self.device), "num_devices": self.num_devices,
               "price_per_device_hour": self.price, "device_hours": wall / 3600 * self.num_devices,
               "cost": self.cost(self.t0 + wall), "logged_steps": len(recs),
               "last_step": recs[-1]["step"] if recs else None,
               "data_wait_s": self._data_wait_s, "data_wait_fraction": self._data_wait_s / wall if wall else 0.0,
               "monitor_log_s": self._log_s, "monitor_log_fraction": self._log_s / wall if wall else 0.0,
               "monitor_thread_cpu_s": self._thread_cpu_s,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "mean_cpu_percent": mean("cpu_percent", samples),
               "mean_process_cpu_percent": mean("process_cpu_percent", samples),
               "mean_iowait_percent": mean("iowait_percent", samples),
               "mean_gpu_util_percent": mean("gpu_util_percent", samples),
               "peak_gpu_mem_used_mb": peak("gpu_mem_used_mb", samples),
               "num_samples": len(samples)}
        tokens = [r["tokens"] for r in recs if isinstance(r.get("tokens"), (int, float))]
        if tokens and len(recs) > 1 and recs[-1]["time"] > recs[0]["time"]:
            out["tokens_total"] = sum(tokens)
            out["tokens_per_s"] = sum(tokens[1:]) / (recs[-1]["time"] - recs[0]["time"])
        last = {}
        for r in recs:
            last.update({k: v for k, v in r.items() if k not in ("step", "time")})
        out["last"] = last
        return out

    def plot(self, out_dir=None) -> List[Path]:
        """Write loss.png, throughput.png, cost.png and resources.png (headless,
        matplotlib's Agg canvas, no pyplot state); returns the paths written."""
        from matplotlib.figure import Figure

        if not self._closed and self._started:
            self.flush()
        out = Path(out_dir) if out_dir is not None else self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        recs, samples, paths = self.records, self.samples, []

        def series(rows, key, x="step"):
            pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            return [p[0] for p in pts], [p[1] for p in pts]

        def save(fig, name):
            p = out / name
            fig.savefig(p, dpi=100)
            paths.append(p)

        keys = sorted({k for r in recs for k in r})
        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.add_subplot()
        for k in [k for k in keys if "loss" in k and k != "loss_scale"]:
            ax.plot(*series(recs, k), label=k)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("loss")
        if ax.lines:
            ax.legend()
        save(fig, "loss.png")

        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.add_subplot()
        for k in ("tokens_per_s", "samples_per_s"):
            xs, ys = series(recs, k)
            if ys:
                w = max(1, len(ys) // 50)  # moving average over ~2% of the run
                sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
                ax.plot(xs, sm, label=f"{k} (moving avg {w})")
        ax.set_xlabel("step"), ax.set_ylabel("per second"), ax.set_title("throughput")
        if ax.lines:
            ax.legend()
        save(fig, "throughput.png")

        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.add_subplot()
        xs = [s["time"] / 60 for s in samples]
        if self.price is not None:
            ax.plot(xs, [s["cost"] for s in samples])
            ax.set_ylabel(f"cost (at {self.price}/device-hour x {self.num_devices})")
        else:
            ax.plot(xs, [s["time"] / 3600 * self.num_devices for s in samples])
            ax.set_ylabel("device-hours (no price set)")
        ax.set_xlabel("minutes"), ax.set_title("cost over time")
        save(fig, "cost.png")

        fig = Figure(figsize=(8, 6), layout="tight")
        ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
        for k in ("cpu_percent", "process_cpu_percent", "iowait_percent", "gpu_util_percent"):
            sx, sy = series(samples, k, x="time")
            if sy:
                ax1.plot([x / 60 for x in sx], sy, label=k)
        ax1.set_ylabel("%"), ax1.set_title("utilisation")
        for k in ("rss_mb", "gpu_mem_used_mb", "torch_allocated_mb"):
            sx, sy = series(samples, k, x="time")
            if sy:
                ax2.plot([x / 60 for x in sx], sy, label=k)
        ax2.set_xlabel("minutes"), ax2.set_ylabel("MiB"), ax2.set_title("memory")
        for a in (ax1, ax2):
            if a.lines:
                a.legend(fontsize=8)
        save(fig, "resources.png")
        return paths
