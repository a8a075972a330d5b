"""int8-compressed gradient allreduce as a DDP communication hook.

Flat mode (every rank a peer), per bucket of ``N`` elements on ``p`` ranks::

    pad N to Npad, a multiple of p * block_size; shard s = Npad / p
    q1, s1 = quantize_int8_ef_(bucket, residual1)        # error feedback, per rank
    all_to_all_single(int8 chunks + fp32 scales)          # rank j receives shard j of everyone
    shard = dequantize_reduce_int8(.., multiplier=1/p)    # mean of the shard, fp32
    q2, s2 = quantize_int8_ef_(shard, residual2)          # shard owner's error feedback
    all_gather(int8 shard + scales)                       # everyone gets every shard
    bucket <- dequantize_int8(..)                         # the averaged gradient

Each rank sends ``2 * Npad * (p - 1) / p * (1 + 4 / block_size)`` bytes, against
``8 * N * (p - 1) / p`` for an fp32 ring allreduce: 0.254x at block_size 256.

Hierarchical mode (``L`` ranks per node, ``M`` nodes; ranks numbered node by
node as ``torchrun`` does): bf16 reduce-scatter inside the node (with its own
error feedback), the flat int8 scheme above between nodes on each local
rank's 1/L of the bucket, then an int8 all-gather inside the node. Each node
sends ``2 * Npad * (M - 1) / M * (1 + 4 / block_size)`` bytes to other nodes.

In both modes a bucket of more than ``chunk_numel`` values goes as chunks
aligned to ``p * block_size``, each its own pipeline of the stages above, so
that compressing one chunk overlaps sending another.

Every stage after the first starts from the previous collective's callback,
never waits, and uses its own process group, launched in bucket order by an
:class:`~._pipeline.OrderedLauncher`; the hook returns a future that the last
callback completes (or fails, naming the bucket, the rank and the cause).
"""

import time

import torch
import torch.distributed as dist

from deepseek_ext import ops
from deepseek_ext.distributed._packed import Packed, round_up
from deepseek_ext.distributed._pipeline import (
    FutureJoin,
    HostTimer,
    completed_future,
    ring_allreduce_bytes,
)
from deepseek_ext.distributed._policy import calibrate
from deepseek_ext.distributed.allreduce_hook import allreduce_mean
from deepseek_ext.distributed.int8_state import Int8CompressionState

__all__ = ["int8_compress_hook"]


def _signature(buffer: torch.Tensor, shapes):
    """What a bucket's residuals are checked against (shapes: None when unknown)."""
    return (buffer.numel(), buffer.dtype, None if shapes is None else tuple(tuple(s) for s in shapes))


def _quantize(state: Int8CompressionState, x, residual, offset):
    bs, sr, seed = state.block_size, state.stochastic_rounding, state.seed + state.rank
    if state.error_feedback:
        return ops.quantize_int8_ef_(x, residual, bs, sr, seed, offset)
    return ops.quantize_int8(x, bs, sr, seed, offset)


def _gather_requantized_mean(state, recv, residual, offset, ranks, shard, group):
    """The second stage of both modes: this rank's shard of the mean over all
    ``state.world_size`` ranks (dequantise-reduce of the int8 pieces ``recv``
    holds), re-quantised with the shard owner's ``residual`` and all-gathered
    from the ``ranks`` ranks of ``group``. Returns (future, packed output)."""
    bs, device = state.block_size, recv.buf.device
    mean = ops.dequantize_reduce_int8(recv.q, recv.scales, bs, 1.0 / state.world_size, torch.float32)
    q, s = _quantize(state, mean, residual, offset)
    send = Packed(1, shard, bs, device)
    send.fill(q, s)
    out = Packed(ranks, shard, bs, device)
    # 1-D on both sides: Gloo compares the input's shape with output.chunk(ranks)'s.
    fut = dist.all_gather_into_tensor(out.buf.view(-1), send.buf.view(-1), group=group, async_op=True)
    return fut.get_future(), out


class _Pipeline:
    """Runs the stages of one compressed bucket: stage 0 now (from the hook),
    stage k from stage k - 1's callback through launcher k, then ``finish``."""

    def __init__(self, state, seq, idx, iteration, buffer, stages, finish):
        self.state, self.seq, self.idx, self.iteration = state, seq, idx, iteration
        self.stages, self.finish = stages, finish
        self._inner = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        # Raising inside a then-callback completes the future with a real error
        # that DDP reports as is (set_exception alone stores the exception as a
        # value, which DDP's C++ side then fails to cast to a Tensor).
        self.result = self._inner.then(lambda f: f.value())
        self._failed = False

    def start(self) -> torch.futures.Future:
        self._run(0, None)
        return self.result

    def _run(self, k: int, payload) -> None:
        try:
            self.state._mark(f"stage{k}_start", self.idx, self.iteration)
            with HostTimer(self.state._counters):
                fut, payload = self.stages[k](payload)
            self.state._mark(f"stage{k}_launched", self.idx, self.iteration)
        except BaseException as e:  # noqa: BLE001 -- must reach the future, or DDP waits forever
            self._fail(k, e)
            return
        fut.then(lambda f: self._done(k, f, payload))

    def _done(self, k: int, fut, payload) -> None:
        try:
            fut.value()  # raises what the collective raised (peer gone, timeout)
            self.state._mark(f"stage{k}_done", self.idx, self.iteration)
            if k == 0:
                self.state._mark("sent", self.idx, self.iteration)
            if k + 1 < len(self.stages):
                self.state._launchers[k + 1].submit(self.seq, lambda: self._run(k + 1, payload))
                return
            with HostTimer(self.state._counters):
                out = self.finish(payload)
            self.state._mark("done", self.idx, self.iteration)
            self._inner.set_result(out)
        except BaseException as e:  # noqa: BLE001
            self._fail(k, e)

    def _fail(self, k: int, err: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        for launcher in self.state._launchers[k + 1:]:
            launcher.skip(self.seq)  # later buckets must not wait for this one
        self._inner.set_exception(RuntimeError(
            f"int8_compress_hook: bucket {self.idx} (iteration {self.iteration}) failed in stage {k} "
            f"on rank {self.state.rank} of {self.state.world_size}; a peer may have died or the process "
            f"group timed out: {type(err).__name__}: {err}"))


def int8_compress_hook(state: Int8CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over the group,
    sent as blockwise int8 with error feedback (see the module docstring).

    Never waits: it launches the first collective and returns a future that the
    last collective's callback completes with the averaged gradients, written
    into ``bucket.buffer()`` itself (chunk by chunk for a large bucket), so
    DDP copies nothing. ``bucket`` needs ``buffer()``, ``index()`` and ``is_last()`` (and,
    optionally, ``parameters()`` and ``gradients()``), as
    ``torch.distributed.GradBucket`` has.
    """
    t0 = time.perf_counter()
    state._ensure_bound()
    buffer = bucket.buffer()
    idx = bucket.index()
    last = bucket.is_last()
    iteration = state.iteration
    if last:
        state.iteration += 1
    state._mark("hook", idx, iteration)
    if buffer.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"int8_compress_hook: bucket {idx} must be float32, float16 or bfloat16, got {buffer.dtype}")
    params = bucket.parameters() if hasattr(bucket, "parameters") else None
    keys = state._layout_keys(params)
    saved = state._replay_plan(idx, keys)
    if saved is None:
        state._layout_now[idx] = keys
        signature = _signature(buffer, None if params is None else [p.shape for p in params])
        fut = _average(state, buffer, idx, iteration, signature)
    else:
        fut = _replay(state, bucket, buffer, keys, saved, iteration)
    if last:
        state._end_iteration()
    state._counters.add(hook_calls=1, hook_time_s=time.perf_counter() - t0)
    return fut


def _average(state, buffer, idx, iteration, signature) -> torch.futures.Future:
    """Starts averaging one bucket's flat gradients ``buffer`` (bucket index
    ``idx``: its residuals) and counts it; returns the future of the result."""
    n, p = buffer.numel(), state.world_size
    fp32_bytes = ring_allreduce_bytes(n, p, 4)
    # One rank has nothing to send; policy="always" still runs the int8 path there
    # (a one-GPU run that exercises compression: the demo's GPU preset).
    compress = ((p > 1 or state.policy == "always") and iteration >= state.start_iter
                and n >= state.min_compress_numel)
    if compress and state.policy == "auto":
        if state.calibration is None:
            state.calibration = calibrate(state.process_group, buffer.device, state.block_size,
                                          state.chunk_numel, state.link_bandwidth)
        compress = state._compress_wins(n, buffer.element_size(), _int8_bytes(state, n))
        state._decisions[idx] = "int8" if compress else "allreduce"
        if not compress:
            state._counters.add(policy_allreduce_calls=1)
    if not compress:
        sent = ring_allreduce_bytes(n, p, buffer.element_size())
        state._counters.add(allreduce_calls=1, bytes_sent=sent, bytes_sent_inter_node=sent,
                            bytes_fp32_equivalent=fp32_bytes)
        return allreduce_mean(buffer, state.process_group) if p > 1 else completed_future(buffer)
    if state.hierarchical:
        chunks, sent, inter = _hierarchical_chunks(state, buffer, idx, signature)
    else:
        chunks, sent = _flat_chunks(state, buffer, idx, signature)
        inter = sent
    state._counters.add(compressed_calls=1, bytes_sent=sent, bytes_sent_inter_node=inter,
                        bytes_fp32_equivalent=fp32_bytes)
    if len(chunks) == 1:
        stages, finish = chunks[0]
        return _Pipeline(state, next(state._seq), idx, iteration, buffer, stages, finish).start()
    join = FutureJoin(len(chunks), buffer)
    for stages, finish in chunks:
        fut = _Pipeline(state, next(state._seq), idx, iteration, buffer, stages, finish).start()
        fut.then(lambda f: _join_part(f, join))
    return join.result


def _join_part(fut, join) -> None:
    try:
        fut.value()
        join.done()
    except BaseException as e:  # noqa: BLE001 -- must reach the joined future, or DDP waits forever
        join.fail(e)


def _chunk_bounds(state, n: int):
    """[(lo, hi), ...]: the chunks a bucket of n elements is sent as, each a
    whole number of p * block_size pieces except the last."""
    unit = state.world_size * state.block_size
    size = max(state.chunk_numel // unit, 1) * unit
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _int8_bytes(state, n: int) -> int:
    """Bytes one rank sends to average a bucket of n elements compressed
    (hierarchical: the 16-bit reduce-scatter inside the node counted at 2 bytes)."""
    p, bs, total = state.world_size, state.block_size, 0
    for lo, hi in _chunk_bounds(state, n):
        if state.hierarchical:
            L, M = state.local_world_size, state.num_nodes
            sub = round_up(hi - lo, p * bs) // L // M
            row = sub + 4 * (sub // bs)
            total += 2 * (M - 1) * row + (L - 1) * sub * M * 2 + (L - 1) * M * row
        else:
            shard = round_up(hi - lo, p * bs) // p
            total += 2 * (p - 1) * (shard + 4 * (shard // bs))
    return total


def _replay(state, bucket, buffer, keys, saved, iteration) -> torch.futures.Future:
    """Averages DDP's bucket as the loaded buckets ``saved`` that make it up:
    each one's gradients gathered in its saved parameter order, averaged as
    that bucket (its index, residuals and random offsets, in saved order, as
    the run that saved them would have), the result written back into the
    bucket's buffer. Returns one future for the whole buffer."""
    views = dict(zip(keys, bucket.gradients()))  # (key, shape) -> that parameter's view into the buffer
    join = FutureJoin(len(saved), buffer)
    for j in saved:
        parts = [views[k] for k in state._replay[j]]
        flat = torch.cat([v.reshape(-1) for v in parts])
        state._layout_now[j] = state._replay[j]
        fut = _average(state, flat, j, iteration, _signature(flat, [v.shape for v in parts]))
        fut.then(lambda f, parts=parts: _write_back(f, parts, join))
    state.replayed_buckets += len(saved)
    state._replayed_now = True
    return join.result


def _write_back(fut, parts, join) -> None:
    try:
        out, offset = fut.value(), 0
        for v in parts:
            v.copy_(out[offset: offset + v.numel()].view_as(v))
            offset += v.numel()
        join.done()
    except BaseException as e:  # noqa: BLE001 -- must reach the joined future, or DDP waits forever
        join.fail(e)


def _flat_chunks(state, buffer, idx, signature):
    """The pipelines (stages, finish) of a flat bucket, one per chunk, and the
    bytes they send. Each chunk is quantised with its slice of the bucket's
    residual and averaged into its slice of ``buffer`` (which the hook's
    future returns: DDP then copies nothing). Its random offsets are its
    position in the bucket's stream, so one chunk equals the unchunked scheme."""
    p, bs, n = state.world_size, state.block_size, buffer.numel()
    device = buffer.device
    bounds = _chunk_bounds(state, n)
    pads = [round_up(hi - lo, p * bs) for lo, hi in bounds]
    shards = [npad // p for npad in pads]
    res = state._bucket_residuals(idx, signature,
                                  {"bucket": (n, device), "shard": (sum(shards), device)})
    base, total_pad = state.rng_offset, sum(pads)
    state.rng_offset += total_pad + sum(shards)
    g1, g2 = state._stage_groups
    chunks, sent, shard_lo = [], 0, 0
    for (lo, hi), npad, shard in zip(bounds, pads, shards):
        x, r1 = buffer[lo:hi], res["bucket"][lo:hi]
        r2 = res["shard"][shard_lo: shard_lo + shard]
        off1, off2 = base + lo, base + total_pad + shard_lo
        shard_lo += shard

        def all_to_all(_, x=x, r1=r1, off1=off1, shard=shard):
            q, s = _quantize(state, x, r1, off1)
            send = Packed(p, shard, bs, device)
            send.fill(q.view(-1), s)
            recv = Packed(p, shard, bs, device)
            return dist.all_to_all_single(recv.buf, send.buf, group=g1, async_op=True).get_future(), recv

        def all_gather(recv, r2=r2, off2=off2, shard=shard):
            return _gather_requantized_mean(state, recv, r2, off2, p, shard, g2)

        def finish(gathered, x=x, npad=npad):
            deq = ops.dequantize_int8(gathered.q.reshape(-1), gathered.scales.reshape(-1), bs, buffer.dtype, npad)
            x.copy_(deq[: x.numel()])  # this chunk's slice of the bucket: read by its quantisation only
            return buffer

        chunks.append(([all_to_all, all_gather], finish))
        sent += 2 * (p - 1) * (shard + 4 * (shard // bs))
    return chunks, sent


def _hierarchical_chunks(state, buffer, idx, signature):
    """The pipelines (stages, finish) of a bucket in hierarchical mode, one per
    chunk (the bounds of :func:`_chunk_bounds`, as in flat mode), and the bytes
    they send: in all, and to other nodes. Each chunk is averaged into its
    slice of ``buffer``; its residual slices and random offsets are its
    position in the bucket's, so one chunk equals the unchunked scheme."""
    L, M, bs, n = state.local_world_size, state.num_nodes, state.block_size, buffer.numel()
    p = L * M
    device = buffer.device
    wire = buffer.dtype if buffer.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    bounds = _chunk_bounds(state, n)
    pads = [round_up(hi - lo, p * bs) for lo, hi in bounds]
    parts = [npad // L for npad in pads]  # this local rank's share of the node sum
    subs = [part // M for part in parts]  # the piece of it this rank owns between nodes
    res = state._bucket_residuals(idx, signature, {
        "cast": (n, device), "part": (sum(parts), device), "shard": (sum(subs), device)})
    base, total_part = state.rng_offset, sum(parts)
    state.rng_offset += total_part + sum(subs)
    g_intra, g_inter_a, g_inter_b, g_intra_b = state._stage_groups
    chunks, sent, inter, part_lo, sub_lo = [], 0, 0, 0, 0
    for (lo, hi), npad, part, sub in zip(bounds, pads, parts, subs):
        x, r_cast = buffer[lo:hi], res["cast"][lo:hi]
        r_part, r_shard = res["part"][part_lo: part_lo + part], res["shard"][sub_lo: sub_lo + sub]
        off1, off2 = base + part_lo, base + total_part + sub_lo
        part_lo, sub_lo = part_lo + part, sub_lo + sub

        def intra_reduce_scatter(_, x=x, r_cast=r_cast, npad=npad, part=part):
            # bf16 (or the bucket's 16-bit type) with its own error feedback.
            y = r_cast + x if state.error_feedback else x.float()  # x is only read here; finish writes it
            send = torch.zeros(npad, dtype=wire, device=device)
            send[: x.numel()] = y
            if state.error_feedback:
                r_cast.copy_(y - send[: x.numel()].float())
            recv = torch.empty(L, part, dtype=wire, device=device)
            return dist.all_to_all_single(recv, send, group=g_intra, async_op=True).get_future(), recv

        def inter_all_to_all(recv, r_part=r_part, off1=off1, sub=sub):
            node_sum = recv.float().sum(0)
            q, s = _quantize(state, node_sum, r_part, off1)
            send = Packed(M, sub, bs, device)
            send.fill(q, s)
            out = Packed(M, sub, bs, device)
            return dist.all_to_all_single(out.buf, send.buf, group=g_inter_a, async_op=True).get_future(), out

        def inter_all_gather(recv, r_shard=r_shard, off2=off2, sub=sub):
            return _gather_requantized_mean(state, recv, r_shard, off2, M, sub, g_inter_b)

        def intra_all_gather(gathered, sub=sub):
            out = torch.empty(L * gathered.buf.numel(), dtype=torch.uint8, device=device)
            fut = dist.all_gather_into_tensor(out, gathered.buf.view(-1), group=g_intra_b, async_op=True)
            return fut.get_future(), Packed(L * M, sub, bs, device, buf=out)

        def finish(everything, x=x, npad=npad):
            deq = ops.dequantize_int8(everything.q.reshape(-1), everything.scales.reshape(-1), bs, buffer.dtype, npad)
            x.copy_(deq[: x.numel()])  # this chunk's slice of the bucket: read by its first stage only
            return buffer

        chunks.append(([intra_reduce_scatter, inter_all_to_all, inter_all_gather, intra_all_gather], finish))
        row = sub + 4 * (sub // bs)
        inter += 2 * (M - 1) * row
        sent += 2 * (M - 1) * row + (L - 1) * part * torch.finfo(wire).bits // 8 + (L - 1) * M * row
    return chunks, sent, inter
