"""Shared-attention layers: parameters, optimizer memory, step time and quality
of each sharing plan against the unshared model, measured in one run.

Configurations (pre-norm LM, tied embeddings):
  bert-base  12 layers, d=768, 12 heads, FFN 3072, vocab 30522, 512 positions;
             batch x seq from --bert-batch (default 1 x 128 on CPU, 8 x 512 on CUDA)
  small      6 layers, d=256, 4 heads, FFN 1024, vocab 256, 256 positions;
             batch 8 x 128 on CPU, 32 x 256 on CUDA

Plans: none (baseline), all, sequence / cycle / cycle_reverse (n_unique = n_layers / 3
for bert-base, 2 for small), and all + factorised embedding (E = 128 / 64).

1. Parameters and Adam state (exp_avg + exp_avg_sq, float32) from
   deepseek_ext.nn.parameter_report, which the tests hold equal to the models'
   real parameter counts.
2. Step time: forward + backward, and the Adam step, of one batch; each plan
   timed in alternating rounds beside the unshared model (medians over rounds),
   ratio to it. "step" = forward + backward + Adam.
3. Peak memory of building the model and training two steps. CPU, two measures,
   each in a fresh process: (a) RSS: with glibc's mmap threshold fixed at
   128 KiB, so that large tensor buffers are mmapped and returned on free, peak
   RSS (VmHWM) minus the RSS before the model was built; it also counts the
   allocator's heap and varies by a few tenths of a MiB from run to run;
   (b) tensors: the peak of the live CPU tensor bytes in the profiler's memory
   timeline (torch.profiler, profile_memory), exact and the CPU counterpart of
   CUDA's max_memory_allocated. CUDA: max_memory_allocated, in process (both
   columns). Compared with the saved parameters + Adam state (12 B/parameter)
   and + gradients (16 B). Plans with equal parameter counts are measured once.
4. Quality: a byte-level LM (vocab 256) on the Python standard library's .py
   sources (last 10% of the files held out), unshared vs sharing="all",
   trained on the same batches from the same seed; eval loss (nats/byte) on the
   same held-out windows.

    python benchmarks/bench_shared_attention.py [--rounds 3] [--quality-steps 200] [--out PATH]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext.nn import SharedAttentionTransformer, parameter_report  # noqa: E402

CONFIGS = {
    "bert-base": dict(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512),
    "small": dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_seq_len=256),
}
FACTORISED_E = {"bert-base": 128, "small": 64}


def plans(config_name):
    n = CONFIGS[config_name]["n_layers"]
    m = max(1, n // 3)
    return {
        "none": dict(sharing="none"),
        "all": dict(sharing="all"),
        f"sequence/{m}": dict(sharing="sequence", n_unique=m),
        f"cycle/{m}": dict(sharing="cycle", n_unique=m),
        f"cycle_reverse/{m}": dict(sharing="cycle_reverse", n_unique=m),
        f"all+E{FACTORISED_E[config_name]}": dict(sharing="all", embed_dim=FACTORISED_E[config_name]),
    }


def mib(n):
    return n / 2**20


# ---- one training step ----

def make_step(model, batch, seq, seed=0):
    """One training step; returns (forward + backward seconds, Adam step seconds).
    On CUDA the host clock is read after synchronising the device (benchmark only)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        sync()
        t0 = time.perf_counter()
        logits = model(inp)
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt.reshape(-1))
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t1

    return step


def time_plans(config_name, batch, seq, rounds, device):
    """Median forward + backward and Adam-step seconds of each plan, in alternating rounds."""
    steps = {}
    for name, kw in plans(config_name).items():
        torch.manual_seed(0)
        steps[name] = make_step(SharedAttentionTransformer(**CONFIGS[config_name], **kw).to(device), batch, seq)
        steps[name]()  # warm-up (and Adam state)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
    med = lambda v: sorted(v)[len(v) // 2]
    return {name: (med([a for a, _ in t]), med([b for _, b in t]), med([a + b for a, b in t]))
            for name, t in times.items()}


# ---- peak memory, in a child process ----

def _status_bytes(field):
    # VmHWM is the high-water mark of this process image (ru_maxrss is not: Linux
    # carries it over from the forking parent across exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _tensor_peak_bytes(run):
    """Peak live CPU tensor bytes while run() runs, from the profiler's memory timeline."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated in 2.11
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)  # [times, [bytes per category] per time]
    return max((sum(s) for s in sizes), default=0)


def memory_child(spec):
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)

    def run():
        model = SharedAttentionTransformer(**CONFIGS[spec["config"]], **plans(spec["config"])[spec["plan"]])
        step = make_step(model, spec["batch"], spec["seq"])
        for _ in range(2):
            step()

    if spec["measure"] == "tensors":
        print(json.dumps({"peak_bytes": _tensor_peak_bytes(run)}))
        return
    before = _status_bytes("VmRSS")
    run()
    print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - before}))


def measure_peak(config_name, plan, batch, seq, device):
    """(RSS peak, tensor peak) in bytes; on CUDA both are max_memory_allocated."""
    if device == "cuda":  # the caching allocator's own statistics, in this process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = SharedAttentionTransformer(**CONFIGS[config_name], **plans(config_name)[plan]).cuda()
        step = make_step(model, batch, seq)
        for _ in range(2):
            step()
        peak = torch.cuda.max_memory_allocated() - before
        del model, step
        return peak, peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    peaks = []
    for measure in ("rss", "tensors"):
        spec = json.dumps(dict(config=config_name, plan=plan, batch=batch, seq=seq,
                               threads=torch.get_num_threads(), measure=measure))
        out = subprocess.run([sys.executable, __file__, "--memory-child", spec], env=env, check=True,
                             capture_output=True, text=True, timeout=1200)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])
    return tuple(peaks)


# ---- quality on real text ----

def stdlib_bytes():
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    cut = int(len(files) * 0.9)
    read = lambda fs: torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in fs)), dtype=torch.uint8)
    return read(files[:cut]).long(), read(files[cut:]).long(), len(files)


def train_lm(sharing, train, held_out, steps, batch, seq, cfg, eval_windows, device="cpu"):
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**cfg, sharing=sharing).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(1)  # the same batches for every plan
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=g)
        chunk = torch.stack([train[s:s + seq + 1] for s in starts.tolist()]).to(device)
        loss = F.cross_entropy(model(chunk[:, :-1]).reshape(-1, 256), chunk[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    stride = (held_out.numel() - seq - 1) // eval_windows
    with torch.no_grad():
        chunk = torch.stack([held_out[i * stride:i * stride + seq + 1] for i in range(eval_windows)]).to(device)
        losses = [F.cross_entropy(model(c[:, :-1]).reshape(-1, 256), c[:, 1:].reshape(-1)).item()
                  for c in chunk.split(16)]
    return {"eval_loss": sum(losses) / len(losses), "final_train_loss": loss.item(),
            "params": sum(p.numel() for p in model.parameters()), "train_seconds": train_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (bert-base)")
    p.add_argument("--small-rounds", type=int, default=5, help="alternating timing rounds (small)")
    p.add_argument("--bert-batch", default=None, help="batch x seq for timing bert-base "
                   "(default 1x128 on CPU, 8x512 on CUDA)")
    p.add_argument("--quality-steps", type=int, default=200)
    p.add_argument("--quality-batch", type=int, default=8)
    p.add_argument("--configs", default="bert-base,small", help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--parts", default="tables,quality",
                   help="tables (1-3) and/or quality (4); the header says which parts a table holds")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/shared_attention_<device class>.md)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    dev = args.device
    bert_b, bert_t = (int(v) for v in (args.bert_batch or ("8x512" if dev == "cuda" else "1x128")).split("x"))
    shapes = {"bert-base": (bert_b, bert_t), "small": (32, 256) if dev == "cuda" else (8, 128)}
    rounds = {"bert-base": args.rounds, "small": args.small_rounds}
    parts = args.parts.split(",")
    text = header("Shared-attention layers: sharing plans vs unshared", dev)
    if set(parts) != {"tables", "quality"}:
        text += f"- parts: {args.parts} only (--parts)\n"
    load_start = os.getloadavg()[0]
    for cname in (args.configs.split(",") if "tables" in parts else []):
        cfg = CONFIGS[cname]
        b, t = shapes[cname]
        print(f"== {cname}: timing {b}x{t}, {rounds[cname]} rounds", flush=True)
        times = time_plans(cname, b, t, rounds[cname], dev)
        rows, entries, peaks = [], {}, {}
        for plan, kw in plans(cname).items():
            rep = parameter_report(dict(cfg, **kw))
            # Plans with the same parameter count (sequence / cycle / cycle_reverse
            # with the same n_unique) build the same tensors: measured once.
            same = next((q for q in peaks if entries[q]["report"]["params"] == rep["params"]), None)
            if args.skip_memory:
                peak = tensor_peak = None
            elif same is not None:
                peak, tensor_peak = peaks[same]
            else:
                peak, tensor_peak = peaks[plan] = measure_peak(cname, plan, b, t, dev)
            fb, adam, step = times[plan]
            print(f"   {plan}: fwd+bwd {fb:.3f} s, Adam {adam:.3f} s, "
                  f"peak {'-' if peak is None else f'{mib(peak):.2f} MiB, tensors {mib(tensor_peak):.2f} MiB'}",
                  flush=True)
            entries[plan] = dict(report=rep, fwd_bwd_s=fb, adam_s=adam, step_s=step, peak_bytes=peak,
                                 tensor_peak_bytes=tensor_peak, peak_measured_as=same or plan)
        base = entries["none"]
        for plan, e in entries.items():
            rep = e["report"]
            saved = lambda key: None if e[key] is None else base[key] - e[key]
            e["step_ratio"] = e["step_s"] / base["step_s"]
            e["fwd_bwd_ratio"] = e["fwd_bwd_s"] / base["fwd_bwd_s"]
            e["peak_saved_bytes"] = saved("peak_bytes")
            e["tensor_peak_saved_bytes"] = saved("tensor_peak_bytes")
            e["params_adam_bytes_saved"] = 3 * (rep["param_bytes_unshared"] - rep["param_bytes"])
            fmt = lambda v: "-" if v is None else f"{mib(v):.2f}"
            rows.append([
                plan, f"{rep['params'] / 1e6:.2f}M", f"{100 * rep['reduction']:.1f}%",
                f"{mib(rep['adam_state_bytes']):.0f}",
                f"{mib(e['params_adam_bytes_saved']):.2f}", f"{mib(rep['training_state_bytes_saved']):.2f}",
                f"{e['fwd_bwd_s'] * 1e3:.0f}", f"{e['fwd_bwd_ratio']:.3f}", f"{e['adam_s'] * 1e3:.0f}",
                f"{e['step_s'] * 1e3:.0f}", f"{e['step_ratio']:.3f}",
                fmt(e["peak_bytes"]), fmt(e["peak_saved_bytes"]),
                fmt(e["tensor_peak_bytes"]), fmt(e["tensor_peak_saved_bytes"]),
            ])
        text += (f"\n## {cname} ({', '.join(f'{k}={v}' for k, v in cfg.items())}; "
                 f"batch {b} x seq {t}, float32)\n\n")
        text += markdown_table(
            ["plan", "params", "fewer params", "Adam state MiB", "saved p+Adam MiB", "saved p+g+Adam MiB",
             "fwd+bwd ms", "x none", "Adam ms", "step ms", "x none", "peak MiB", "peak saved MiB",
             "tensor peak MiB", "tensor peak saved MiB"], rows)

    if "quality" not in parts:
        return finish(text, load_start, args)
    print(f"== quality: {args.quality_steps} steps, unshared vs all", flush=True)
    train, held_out, n_files = stdlib_bytes()
    qcfg = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=128)
    qb = args.quality_batch
    qual = {s: train_lm(s, train, held_out, args.quality_steps, qb, 128, qcfg, 128, dev) for s in ("none", "all")}
    rel = qual["all"]["eval_loss"] / qual["none"]["eval_loss"] - 1
    for s, r in qual.items():
        print(f"   {s}: eval {r['eval_loss']:.4f} nats/byte ({r['params']} params, {r['train_seconds']:.0f} s)")
    text += (f"\n## Quality: byte-level LM on the Python {sys.version.split()[0]} standard library "
             f"({n_files} .py files, {train.numel() / 1e6:.1f} MB train / {held_out.numel() / 1e6:.2f} MB "
             f"held-out files)\n\n{', '.join(f'{k}={v}' for k, v in qcfg.items())}; {args.quality_steps} AdamW "
             f"steps of {qb} x 128 bytes (lr 2e-3, warmup + cosine), the same batches and seed for both; eval on 128 held-out "
             "windows of 128 bytes.\n\n")
    text += markdown_table(
        ["sharing", "params", "final train loss", "eval loss (nats/byte)", "vs none"],
        [[s, r["params"], f"{r['final_train_loss']:.4f}", f"{r['eval_loss']:.4f}",
          "-" if s == "none" else f"{100 * rel:+.2f}%"] for s, r in qual.items()])
    return finish(text, load_start, args)


def finish(text, load_start, args):
    load = (load_start, os.getloadavg()[0])
    text += (f"\nLoad average (1 min) at start / end of the run: {load[0]:.1f} / {load[1]:.1f} on "
             f"{os.cpu_count()} cores (a shared machine: timings carry that noise).\n")
    print(text)
    path = write_results("shared_attention", args.device, text, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
