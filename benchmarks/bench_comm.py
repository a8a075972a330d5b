"""Gradient sync over a rate-limited network: our int8 DDP hook vs torch's
hooks, and our int8 FSDP2 reduce-scatter vs plain FSDP2.

Each "host" is a Linux network namespace with one veth interface (eth0);
2 hosts are joined by one veth pair, more by a bridge in a "switch"
namespace. ``tc qdisc ... tbf`` limits every host's interface, both ways, to
the given rate. In each host namespace ``torchrun`` starts the host's ranks
(multi-node rendezvous on host 0's address, Gloo over eth0), which train the
same model for ``--warmup`` + ``--steps`` steps with each method:

  allreduce   DDP's default (no hook): fp32 ring allreduce
  fp16        torch fp16_compress_hook
  pertensor   torch quantization_pertensor_hook (uint8 all-gather of whole buckets;
              re-stated in pertensor_hook below: torch 2.11's raises on Gloo)
  powersgd    torch PowerSGD, rank 4 (start_powerSGD_iter 2, error feedback)
  int8        ours, flat (all_to_all int8 reduce-scatter + int8 all-gather), policy "auto"
  int8_always ours, policy "always" (every bucket compressed: what "auto" saves)
  int8_hier   ours, hierarchical (bf16 inside a host, int8 between hosts)
  fsdp2       FSDP2 (fully_shard per layer), its own fp32 reduce-scatter
  fsdp2_int8  FSDP2 with enable_int8_reduce_scatter (policy "auto")
  fsdp2_int8ag  the same with int8_all_gather=True (parameters gathered as int8 too)

Two model shapes: "mlp" (seven 4 MB buckets) and "embedding" (one 134 MB
bucket: a language model's vocabulary table).

Reported per timed step: wall time, bytes on the wire per host (eth0 tx
counter, so TCP/IP headers included), bytes our accounting predicts (ours and
the allreduce formula), the final loss (mean of the last 3 steps over all
ranks), and for ours an overlap summary from the hook's timeline.

Needs root (``ip netns``). Every namespace it creates is named ``dsxb*`` and
deleted on exit, also after an error or Ctrl-C. Run through
``benchmarks/netns_launch.sh`` (which also sweeps leftovers), e.g.::

    sudo benchmarks/netns_launch.sh                 # the default sweep (~15 min on 2 cores)
    sudo benchmarks/netns_launch.sh --quick         # one small config
"""

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS_PREFIX = "dsxb"
SUBNET = "10.77.0"
PORT = 29533


# ---------------------------------------------------------------- network (root)


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def ns_names(hosts):
    return [f"{NS_PREFIX}h{i}" for i in range(hosts)]


def teardown():
    out = sh("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NS_PREFIX):
            sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", f"{NS_PREFIX}v0", check=False)


def rate_bits(rate: str) -> int:
    """'1gbit' -> 1e9, '500mbit' -> 5e8."""
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if rate.lower().endswith(unit):
            return int(float(rate[: -len(unit)]) * mult)
    raise ValueError(f"rate must look like 1gbit or 500mbit, got {rate!r}")


def limit(ns, dev, rate):
    if rate == "none":
        return
    burst = max(rate_bits(rate) // 8 // 200, 64 * 1024)  # 5 ms of traffic
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
       "burst", str(burst), "latency", "50ms")


def setup(hosts, rate):
    """hosts namespaces with eth0 at SUBNET.(i+1), limited to rate both ways."""
    teardown()
    names = ns_names(hosts)
    for ns in names:
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    if hosts == 2:
        sh("ip", "link", "add", f"{NS_PREFIX}v0", "type", "veth", "peer", "name", f"{NS_PREFIX}v1")
        for i, ns in enumerate(names):
            sh("ip", "link", "set", f"{NS_PREFIX}v{i}", "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{NS_PREFIX}v{i}", "name", "eth0")
    else:
        sw = f"{NS_PREFIX}sw"
        sh("ip", "netns", "add", sw)
        sh("ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            sh("ip", "link", "add", f"{NS_PREFIX}e{i}", "type", "veth", "peer", "name", f"{NS_PREFIX}p{i}")
            sh("ip", "link", "set", f"{NS_PREFIX}e{i}", "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{NS_PREFIX}e{i}", "name", "eth0")
            sh("ip", "link", "set", f"{NS_PREFIX}p{i}", "netns", sw)
            sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{NS_PREFIX}p{i}", "master", "br0")
            sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{NS_PREFIX}p{i}", "up")
            limit(sw, f"{NS_PREFIX}p{i}", rate)  # the host's download
    for i, ns in enumerate(names):
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        limit(ns, "eth0", rate)  # the host's upload
    return names


LIVE = []  # torchrun processes still running (stopped on any exit)


def stop(procs):
    """SIGTERM to torchrun (it stops its ranks, which run in their own process
    groups), then SIGKILL to what is left of its session."""
    for q in procs:
        if q.poll() is None:
            q.terminate()
    for q in procs:
        try:
            q.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(q.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            q.communicate()


RUNS = itertools.count()


def run_method(names, procs_per_host, method, args, workdir, attempts=2):
    """One method's torchrun on every host; a run that does not finish within
    --run-timeout (a rendezvous that never completes happens now and then on
    a loaded machine) is stopped and tried once more."""
    for attempt in range(attempts):
        try:
            return _run_method(names, procs_per_host, method, args, workdir)
        except TimeoutError as e:
            print(f"{method}: {e}" + ("; trying again" if attempt + 1 < attempts else ""), flush=True)
    raise RuntimeError(f"{method}: torchrun did not finish within {args.run_timeout} s, {attempts} times")


def _run_method(names, procs_per_host, method, args, workdir):
    out_json = Path(workdir) / f"{method}_{len(names)}x{procs_per_host}.json"
    port = PORT + next(RUNS) % 500  # a fresh rendezvous port for every run
    cmds = []
    for i, ns in enumerate(names):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
               f"--nnodes={len(names)}", f"--nproc-per-node={procs_per_host}", f"--node-rank={i}",
               f"--master-addr={SUBNET}.1", f"--master-port={port}", str(Path(__file__).resolve()),
               "--worker", "--method", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--width", str(args.width), "--depth", str(args.depth), "--model", args.model,
               *(["--profile"] if args.profile else []),
               "--out-json", str(out_json)]
        # A session of its own: on a timeout the whole tree (torchrun and its ranks) is killed.
        cmds.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True))
    LIVE[:] = cmds
    deadline = time.monotonic() + args.run_timeout
    logs = []
    for p in cmds:
        try:
            logs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            stop(cmds)
            raise TimeoutError(f"torchrun did not finish within {args.run_timeout} s") from None
    if any(p.returncode for p in cmds) or not out_json.exists():
        raise RuntimeError(f"{method} failed:\n" + "\n".join(log[-3000:] for log in logs))
    if args.profile:
        print(logs[0][-6000:], flush=True)
    return json.loads(out_json.read_text())


# ---------------------------------------------------------------- worker (one rank)


def tx_bytes(dev="eth0"):
    try:
        return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())
    except OSError:
        return 0


def worker(args):
    import datetime

    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deepseek_ext.distributed import Int8CompressionState, int8_compress_hook

    torch.set_num_threads(1)
    t_import = time.perf_counter()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(0)
    model, batch = build_model(args.model, args.width, args.depth)
    # torch's pertensor and PowerSGD hooks wait() inside their callbacks, which run on
    # Gloo's worker threads: with several buckets in flight they can deadlock, so
    # they get one bucket (no overlap for them; their bytes are the same).
    state = fsdp_state = None
    if args.method.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from deepseek_ext.distributed import enable_int8_reduce_scatter

        mesh = init_device_mesh("cpu", (world,))
        for m in model[:-1]:  # one unit per layer, then the root (the head)
            if any(True for _ in m.parameters()):
                fully_shard(m, mesh=mesh)
        ddp = fully_shard(model, mesh=mesh)
        if args.method in ("fsdp2_int8", "fsdp2_int8ag"):
            fsdp_state = enable_int8_reduce_scatter(ddp, int8_all_gather=args.method == "fsdp2_int8ag")
    else:
        ddp = DDP(model, bucket_cap_mb=4 if args.method not in ("pertensor", "powersgd") else 1000)
    if args.method.startswith("fsdp2"):
        pass
    elif args.method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif args.method == "pertensor":
        ddp.register_comm_hook(None, pertensor_hook)
    elif args.method == "powersgd":
        ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(ps, powerSGD_hook.powerSGD_hook)
    elif args.method in ("int8", "int8_hier", "int8_always"):
        state = Int8CompressionState(hierarchical=args.method == "int8_hier", record_timeline=True,
                                     policy="always" if args.method == "int8_always" else "auto")
        if args.method == "int8_hier" and not state.hierarchical:
            raise SystemExit("int8_hier needs several ranks per host")
        ddp.register_comm_hook(state, int8_compress_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
    losses, marks = [], []

    step_times = []

    def step(i):
        t_start = time.perf_counter()
        x, target = batch(torch.Generator().manual_seed(1000 * i + rank))
        loss = torch.nn.functional.mse_loss(ddp(x), target)
        t_bwd = time.perf_counter()
        loss.backward()
        marks.append((t_bwd, time.perf_counter()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        step_times.append(time.perf_counter() - t_start)

    for i in range(args.warmup):
        step(i)
    dist.barrier()
    sent0 = state.stats()["bytes_sent"] if state else 0
    tx0 = tx_bytes()
    if state:
        state.timeline.clear()
    marks.clear()
    step_times.clear()
    fsdp0 = fsdp_state.stats()["bytes_sent"] if fsdp_state else 0
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    tx1 = tx_bytes()
    n = sum(p.numel() for p in model.parameters())
    mine = {
        "host_tx": (tx1 - tx0) if local_rank == 0 else 0,
        "counted": ((state.stats()["bytes_sent"] - sent0) if state else
                    (fsdp_state.stats()["bytes_sent"] - fsdp0) if fsdp_state else None),
        "step_times": step_times,
        "decisions": (sorted(set(state.stats()["decisions"].values())) if state else
                      sorted(set(fsdp_state.stats()["decisions"].values())) if fsdp_state else None),
        "counted_inter": None,
        "elapsed": elapsed,
        "overlap": overlap_summary(state.timeline, marks) if state else None,
    }
    if state:
        mine["counted_inter"] = state.stats()["bytes_sent_inter_node"]
    if args.profile and state and rank == 0:
        last = max(it for _, _, _, it in state.timeline)
        t_bwd = marks[-1][0]
        print("timeline of the last step (ms from backward start):")
        for t, ev, idx, it in state.timeline:
            if it == last:
                print(f"  {(t - t_bwd) * 1e3:9.1f}  bucket {idx}  {ev}")
        print(f"  backward end {(marks[-1][1] - t_bwd) * 1e3:.1f}")
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    final = torch.stack(losses[-3:]).mean()
    dist.all_reduce(final)
    if rank == 0:
        hosts = int(os.environ.get("GROUP_WORLD_SIZE", world // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        res = {
            "method": args.method, "world": world, "hosts": hosts, "params": n, "steps": args.steps,
            "step_s": max(e["elapsed"] for e in everyone) / args.steps,
            # rank 0's timed steps, each from its forward to the end of its optimizer step
            "step_min_s": min(everyone[0]["step_times"]), "step_max_s": max(everyone[0]["step_times"]),
            "decisions": everyone[0]["decisions"],
            "wire_bytes_per_host_step": sum(e["host_tx"] for e in everyone) / hosts / args.steps,
            "fp32_ring_bytes_per_rank_step": 2 * n * (world - 1) / world * 4,
            "counted_bytes_per_rank_step": (sum(e["counted"] for e in everyone) / world / args.steps
                                            if state or fsdp_state else None),
            "final_loss": final.item() / world,
            "overlap": everyone[0]["overlap"],
            "worker_s": time.perf_counter() - t_import,
        }
        Path(args.out_json).write_text(json.dumps(res))
    dist.destroy_process_group()


def build_model(kind, width, depth):
    """(model, batch(generator) -> (input, target)) of a benchmark model shape.

    mlp: depth + 1 x Linear(width, width), many mid-sized buckets.
    embedding: the shape of a language model's vocabulary layers, one large
    bucket: Embedding(65536, 512) (134 MB of fp32 gradient, dense) and a
    Linear(512, 64) head; 16 x 64 tokens per rank, regressed onto a fixed
    random function of the token."""
    import torch

    if kind == "mlp":
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, width))
        teacher = torch.randn(width, width) / width ** 0.5

        def batch(g):
            x = torch.randn(16, width, generator=g)
            return x, x @ teacher
        return model, batch
    if kind == "embedding":
        vocab, dim, out = EMBEDDING_SHAPE
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, out))
        teacher = torch.randn(vocab, out)

        def batch(g):
            tokens = torch.randint(0, vocab, (16, 64), generator=g)
            return tokens, teacher[tokens]
        return model, batch
    raise ValueError(f"model must be 'mlp' or 'embedding', got {kind!r}")


EMBEDDING_SHAPE = (65536, 512, 64)  # vocabulary, embedding width, head outputs


def pertensor_hook(process_group, bucket):
    """torch's ``quantization_pertensor_hook``, step for step, with one fix:
    on Gloo an all_gather future's value is the flat list of output tensors,
    not ``[list]`` as the torch hook indexes it (``fut.wait()[0]``), so the
    torch 2.11 hook raises ``IndexError: invalid index of a 0-dim tensor`` on
    Gloo. Same traffic: an all_gather of (scale, zero point), then of every
    rank's whole uint8 bucket."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.quantization_hooks import (
        _dequantize_per_tensor_backend,
        _quantize_per_tensor_backend,
    )

    world, rank = dist.get_world_size(), dist.get_rank()
    tensor = bucket.buffer()
    observer = torch.ao.quantization.MinMaxObserver()
    observer(tensor)
    s, z = observer.calculate_qparams()
    s_and_z = torch.FloatTensor([s, z])
    all_s_and_z = [torch.zeros_like(s_and_z) for _ in range(world)]
    fut = dist.all_gather(all_s_and_z, s_and_z, async_op=True).get_future()

    def quantize_and_allgather(fut):
        fut.wait()
        q = _quantize_per_tensor_backend(tensor, all_s_and_z[rank][0], all_s_and_z[rank][1])
        outs = [torch.zeros_like(q) for _ in range(world)]
        dist.all_gather(outs, q, async_op=True).get_future().wait()
        return outs

    def dequantize_and_aggregate(fut):
        outs = fut.wait()
        total = torch.zeros_like(outs[0], dtype=torch.float32)
        for r, q in enumerate(outs):
            total += _dequantize_per_tensor_backend(q, all_s_and_z[r][0], all_s_and_z[r][1])
        return total / world

    return fut.then(quantize_and_allgather).then(dequantize_and_aggregate)


def overlap_summary(timeline, marks):
    """Per step: buckets handed over, and how many had their first collective
    completed while backward was still producing later buckets."""
    if not timeline or not marks:
        return None
    steps = {}
    for t, ev, idx, it in timeline:
        steps.setdefault(it, []).append((t, ev, idx))
    rows = []
    for (it, evs), (t_bwd, t_end) in zip(sorted(steps.items()), marks):
        hooks = [t for t, ev, _ in evs if ev == "hook"]
        sent = [t for t, ev, _ in evs if ev == "sent"]
        done = [t for t, ev, _ in evs if ev == "done"]
        last_hook = max(hooks)
        rows.append({
            "buckets": len(hooks),
            "first_hook_ms": (min(hooks) - t_bwd) * 1e3,
            "last_hook_ms": (last_hook - t_bwd) * 1e3,
            "sent_before_last_hook": sum(t < last_hook for t in sent),
            "done_before_last_hook": sum(t < last_hook for t in done),
            "backward_ms": (t_end - t_bwd) * 1e3,
        })
    mid = rows[len(rows) // 2]
    return {"median_step": mid, "steps": len(rows)}


# ---------------------------------------------------------------- orchestration


EMB_METHODS = ["allreduce", "fp16", "powersgd", "int8", "int8_always"]
CONFIGS = [  # (model, hosts, ranks per host, rate, methods)
    ("embedding", 2, 1, "100mbit", ["allreduce", "fp16", "powersgd", "int8"]),
    ("embedding", 2, 1, "1gbit", EMB_METHODS),
    ("embedding", 2, 1, "10gbit", EMB_METHODS),
    ("mlp", 2, 1, "100mbit", ["allreduce", "fp16", "powersgd", "int8", "fsdp2", "fsdp2_int8", "fsdp2_int8ag"]),
    ("mlp", 2, 1, "10gbit", ["allreduce", "int8", "int8_always", "fsdp2", "fsdp2_int8", "fsdp2_int8ag"]),
]
# --world8: bytes at 8 ranks (16 Python processes: slow on 2 cores)
WORLD8 = ("mlp", 8, 1, "none", ["allreduce", "int8", "int8_always", "fsdp2", "fsdp2_int8", "fsdp2_int8ag"])
# --more: the earlier sweep of the mlp shape (4 hosts; 2 ranks per host, hierarchical)
MORE = [("mlp", 4, 1, "1gbit", ["allreduce", "fp16", "pertensor", "powersgd", "int8"]),
        ("mlp", 2, 2, "1gbit", ["allreduce", "int8", "int8_hier"])]


def baseline_of(method: str) -> str:
    """The row a method is compared with: plain FSDP2 for the FSDP2 rows, DDP's allreduce otherwise."""
    return "fsdp2" if method.startswith("fsdp2") else "allreduce"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="int8")
    p.add_argument("--out-json", default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--model", default="mlp", choices=["mlp", "embedding"], help="the worker's model, or --quick's")
    p.add_argument("--profile", action="store_true", help="print rank 0's hook timeline of the last step")
    p.add_argument("--run-timeout", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="only 2 hosts at 1 Gbit/s, allreduce and int8 (--model's shape)")
    p.add_argument("--more", action="store_true", help="also 4 hosts, and 2 hosts x 2 ranks (hierarchical)")
    p.add_argument("--world8", action="store_true", help="also 8 hosts (no rate limit, smaller model): bytes")
    p.add_argument("--world8-only", action="store_true", help="only the 8-host bytes run")
    p.add_argument("--rate", default=None, help="one rate for every configuration (e.g. 100mbit) instead of "
                   "the default 1gbit / 10gbit sweep")
    p.add_argument("--methods", default=None, help="comma-separated methods for every configuration "
                   "(e.g. allreduce,int8) instead of each configuration's own")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/comm_cpu.md)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("bench_comm.py needs root for ip netns / tc (run it through benchmarks/netns_launch.sh)")

    import torch

    from benchmarks.common import header, markdown_table, write_results

    configs = ([(args.model, 2, 1, "1gbit", ["allreduce", "int8"])] if args.quick else
               CONFIGS + (MORE if args.more else []) + ([WORLD8] if args.world8 else []))
    if args.world8_only:
        configs = [WORLD8]
    if args.rate:
        seen, configs = set(), [(md, h, L, args.rate if r != "none" else r, m) for md, h, L, r, m in configs]
        configs = [c for c in configs if c[:4] not in seen and not seen.add(c[:4])]
    if args.methods:
        configs = [(md, h, L, r, args.methods.split(",")) for md, h, L, r, _ in configs]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_comm.py: terminated"))  # run the cleanup
    results, failed = [], []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for model, hosts, per_host, rate, methods in configs:
                names = setup(hosts, rate)
                for method in methods:
                    run_args = argparse.Namespace(**vars(args))
                    run_args.model = model
                    small = hosts * per_host >= 8  # bytes-only run: a smaller model keeps 8 ranks on 2 cores short
                    if small:
                        run_args.width, run_args.steps = 512, 3
                    elif model == "embedding" and rate == "100mbit":
                        run_args.steps = min(args.steps, 4)  # ~12 s per allreduce step
                    t_run = time.monotonic()
                    try:
                        r = run_method(names, per_host, method, run_args, workdir)
                    except RuntimeError as e:  # one method failing must not lose the others
                        print(f"{model} {hosts}x{per_host} {rate} {method}: FAILED: {str(e)[-1500:]}", flush=True)
                        failed.append(f"{model} {hosts}x{per_host} {rate} {method}: {str(e).splitlines()[0]}")
                        continue
                    r.update(rate=rate, per_host=per_host, model=model, run_s=time.monotonic() - t_run)
                    results.append(r)
                    print(f"{model} {hosts}x{per_host} {rate:>6} {method:>10}: {r['step_s'] * 1e3:8.1f} ms/step "
                          f"({r['step_min_s'] * 1e3:.0f}-{r['step_max_s'] * 1e3:.0f}), "
                          f"{r['wire_bytes_per_host_step'] / 1e6:7.2f} MB/host/step, loss {r['final_loss']:.5f} "
                          f"(run {r['run_s']:.0f} s, worker {r['worker_s']:.0f} s)",
                          flush=True)
                teardown()
        finally:
            stop(LIVE)
            teardown()
    vocab, dim, out = EMBEDDING_SHAPE
    text = header("Gradient sync over network namespaces (Gloo, torchrun multi-node): DDP hooks and FSDP2", "cpu")
    text += (f"- model mlp: {args.depth + 1} x Linear({args.width}, {args.width}) "
             f"({(args.depth + 1) * (args.width + 1) * args.width / 1e6:.1f} M params), batch 16 per rank, "
             "DDP bucket_cap_mb=4: seven 4 MB buckets\n"
             f"- model embedding: Embedding({vocab}, {dim}) + Linear({dim}, {out}) "
             f"({(vocab * dim + dim * out + out) / 1e6:.1f} M params, one {vocab * dim * 4 / 1e6:.0f} MB bucket), "
             "16 x 64 tokens per rank\n"
             "- SGD (momentum 0.9); pertensor and powersgd: one bucket (see the module docstring); FSDP2: "
             "fully_shard per layer, then the root, reshard_after_forward=True, fp32 all-gather of parameters\n"
             f"- {args.warmup} warm-up steps, then {args.steps} timed steps (embedding at 100mbit: "
             f"{min(args.steps, 4)}); ms/step = mean over the timed steps of the slowest rank; steps = rank 0's "
             "fastest and slowest timed step (the run-to-run noise of this shared machine: other jobs ran beside it)\n"
             "- hosts = network namespaces, tc tbf on every host link both ways; all ranks share this machine's "
             "CPU cores, 1 torch thread per rank\n"
             f"- total benchmark time: {time.monotonic() - t_start:.0f} s\n\n")
    rows = []
    for model, hosts, per_host, rate, _ in configs:
        group = [r for r in results if r["model"] == model and r["hosts"] == hosts and r["per_host"] == per_host
                 and r["rate"] == rate]
        for r in group:
            base = next((b for b in group if b["method"] == baseline_of(r["method"])), None)
            counted = r["counted_bytes_per_rank_step"]
            fsdp = r["method"].startswith("fsdp2")
            # FSDP2: counted = the int8 reduce-scatter, over an fp32 reduce-scatter (N (p-1) / p x 4).
            ref_bytes = r["fp32_ring_bytes_per_rank_step"] / (2 if fsdp else 1)
            ov = r["overlap"]["median_step"] if r["overlap"] else None
            rows.append([
                model, f"{hosts}x{per_host}", rate, r["method"], f"{r['step_s'] * 1e3:.0f}",
                f"{r['step_min_s'] * 1e3:.0f}-{r['step_max_s'] * 1e3:.0f}",
                f"{r['step_s'] / base['step_s']:.2f}" if base else "",
                f"{r['wire_bytes_per_host_step'] / 1e6:.2f}",
                f"{r['wire_bytes_per_host_step'] / base['wire_bytes_per_host_step']:.3f}" if base else "",
                f"{counted / ref_bytes:.3f}" if counted else "",
                "/".join(r["decisions"]) if r.get("decisions") else "",
                f"{r['final_loss']:.5f}",
                f"{(r['final_loss'] / base['final_loss'] - 1) * 100:+.2f}%" if base else "",
                (f"{ov['sent_before_last_hook']}/{ov['buckets']} sent, {ov['done_before_last_hook']} done "
                 f"before last bucket ({ov['last_hook_ms']:.0f} of {ov['backward_ms']:.0f} ms)") if ov else "",
            ])
    text += markdown_table(
        ["model", "hosts x ranks", "rate", "method", "ms/step", "steps (ms)", "x baseline", "wire MB/host/step",
         "wire x baseline", "counted x fp32", "policy", "final loss", "loss vs baseline",
         "overlap (ours, median step)"], rows)
    text += ("\nbaseline: DDP's allreduce; for the fsdp2 rows, plain FSDP2. wire = eth0 tx bytes of each host "
             "namespace (TCP/IP headers included), per step, averaged over hosts. counted = bytes our stats() say "
             "this rank sent, over 2N(p-1)/p x 4 (an fp32 ring allreduce); fsdp2_int8: the reduce-scatter only, "
             "over N(p-1)/p x 4 (parameters are still all-gathered in fp32; fsdp2_int8ag gathers them as int8, "
             "not counted here: the wire column shows it). policy: what the \"auto\" policy "
             "chose for the buckets (int8_always: the hook with policy=\"always\", no choice). overlap: of the "
             "buckets of one backward, how many had their first chunk's all_to_all completed (sent) / were fully "
             "averaged (done) before backward handed over its last bucket.\n")
    if failed:
        text += "\nFailed runs (not in the table):\n" + "".join(f"- {f}\n" for f in failed)
    print(text)
    path = write_results("comm", "cpu", text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
