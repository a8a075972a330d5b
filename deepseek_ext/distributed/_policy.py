"""When compressing pays: the cost model shared by the DDP hook and the FSDP2
reduce-scatter.

Every rank measures, once, with blocking collectives on the group: the latency
``a`` of a one-element allreduce, the seconds per byte ``b`` of a 4 MB fp32
allreduce (or ``8 / link_bandwidth`` from a hint), and the seconds per element
``c`` of the int8 ops of one chunk on its device. The ranks then take the
maximum of each number (one more allreduce), so that every rank holds the same
numbers and so makes the same decision for every bucket: a decision that
differed between ranks would pair an allreduce on one rank with an all-to-all
on another.
"""

import time
from typing import Optional

import torch
import torch.distributed as dist

from deepseek_ext.distributed._pipeline import ring_allreduce_bytes

PROBE_NUMEL = 1 << 20  # the bandwidth probe: a 4 MB fp32 allreduce
# int8 must be predicted this much faster (int8 time < MARGIN x plain time): the
# model is measured once, on a quiet moment, and compressing by mistake costs a
# slower step; sending plain by mistake only forgoes part of a gain.
MARGIN = 0.8
POLICIES = ("auto", "always")


def check_policy(policy, link_bandwidth) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if link_bandwidth is not None and not (isinstance(link_bandwidth, (int, float)) and link_bandwidth > 0):
        raise ValueError(f"link_bandwidth must be None or a positive number of bits per second, "
                         f"got {link_bandwidth!r}")


def calibrate(group, device: torch.device, block_size: int, chunk_numel: int,
              link_bandwidth: Optional[float]) -> dict:
    """The agreed numbers ``{"latency_s", "s_per_byte", "s_per_element",
    "bandwidth_hint"}`` (see the module docstring). Every rank of ``group``
    must call it at the same point, with nothing else in flight on ``group``."""
    from deepseek_ext import ops

    p = group.size()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best_of(fn, reps):
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    one = torch.zeros(1, device=device)
    dist.all_reduce(one, group=group)  # connections are up before timing
    latency = best_of(lambda: dist.all_reduce(one, group=group), 3)
    if link_bandwidth is None:
        probe = torch.zeros(PROBE_NUMEL, device=device)
        t = best_of(lambda: dist.all_reduce(probe, group=group), 2)
        per_byte = max(t - latency, 0.0) / ring_allreduce_bytes(PROBE_NUMEL, p, 4)
    else:
        per_byte = 8.0 / link_bandwidth
    bs = block_size
    n = max(min(chunk_numel, PROBE_NUMEL) // (p * bs), 1) * p * bs
    x = torch.randn(n, device=device)
    res, res2 = torch.zeros(n, device=device), torch.zeros(n // p, device=device)

    def ops_of_one_chunk():  # what the DDP hook does to a chunk (a superset of the FSDP path's)
        q, s = ops.quantize_int8_ef_(x, res, bs, False, 0, 0)
        mean = ops.dequantize_reduce_int8(q.view(p, -1), s.view(p, -1), bs, 1.0 / p, torch.float32)
        ops.quantize_int8_ef_(mean, res2, bs, False, 0, 0)
        ops.dequantize_int8(q.view(-1), s.view(-1), bs, torch.float32, n)

    ops_of_one_chunk()
    per_element = best_of(ops_of_one_chunk, 2) / n
    agreed = torch.tensor([latency, per_byte, per_element], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    a, b, c = agreed.tolist()
    return {"latency_s": a, "s_per_byte": b, "s_per_element": c, "bandwidth_hint": link_bandwidth is not None}


def compress_wins(cal: dict, n: int, plain_bytes: int, plain_collectives: int, int8_bytes: int,
                  int8_collectives: int) -> bool:
    """True when sending n elements as int8 (``int8_bytes`` in
    ``int8_collectives`` collectives, plus the ops on n elements, counted as if
    they overlapped nothing) is predicted faster than the plain collective(s)
    by the factor MARGIN."""
    a, b, c = cal["latency_s"], cal["s_per_byte"], cal["s_per_element"]
    return int8_collectives * a + b * int8_bytes + c * n < MARGIN * (plain_collectives * a + b * plain_bytes)
