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

Every stage after the first starts from the previous collective's callback,
never waits, and uses its own process group, launched in bucket order by an
:class:`~._pipeline.OrderedLauncher`; the hook returns a future that the last
callback completes (or fails, naming the bucket, the rank and the cause).
"""

import itertools
import os
import time
import warnings
import weakref
from typing import Optional, Union

import torch
import torch.distributed as dist

from deepseek_ext import ops
from deepseek_ext.distributed._pipeline import (
    Counters,
    FutureJoin,
    HostTimer,
    OrderedLauncher,
    check_process_group,
    completed_future,
    ring_allreduce_bytes,
)

__all__ = [
    "Int8CompressionState",
    "int8_compress_hook",
    "CountingAllreduceState",
    "counting_allreduce_hook",
]

_MAX_BLOCK_SIZE = 4096
_STATE_DICT_VERSION = 2  # 2: adds "layout" (version 1 still loads, without it)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _new_group(ranks, backend):
    # Only the members take part (use_local_synchronization), so each node can
    # create its own groups; they must still do it in the same order.
    return dist.new_group(ranks=ranks, backend=backend, use_local_synchronization=True)


def _allreduce_mean(buffer: torch.Tensor, group) -> torch.futures.Future:
    buffer.div_(group.size())
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class _Packed:
    """int8 values and their fp32 scales for ``rows`` chunks of ``n`` elements,
    laid out ``[rows, n + 4 * n / block_size]`` bytes so that one collective
    carries both (row r: chunk r's q, then its scales)."""

    def __init__(self, rows: int, n: int, block_size: int, device, buf: Optional[torch.Tensor] = None):
        self.rows, self.n, self.nb = rows, n, n // block_size
        width = n + 4 * self.nb
        self.buf = buf.view(rows, width) if buf is not None else torch.empty(
            rows, width, dtype=torch.uint8, device=device)

    @property
    def q(self) -> torch.Tensor:  # [rows, n] int8 (row-strided view)
        return self.buf[:, : self.n].view(torch.int8)

    @property
    def scales(self) -> torch.Tensor:  # [rows, nb] float32 (row-strided view)
        return self.buf[:, self.n:].view(torch.float32)

    def fill(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Copy flat ``q`` / ``scales`` (possibly shorter than rows * n: the
        tail is zero padding, which dequantises to 0) into the rows."""
        _copy_padded(self.q, q)
        _copy_padded(self.scales, scales)


def _copy_padded(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst [rows, n] (row-strided) <- flat src of at most rows * n elements, zero tail."""
    rows, n = dst.shape
    full, rem = divmod(src.numel(), n)
    if full:
        dst[:full].copy_(src[: full * n].view(full, n))
    if full < rows:
        dst[full, :rem].copy_(src[full * n:])
        dst[full, rem:].zero_()
        dst[full + 1:].zero_()


class _BucketResiduals:
    """Error-feedback memory of one bucket: valid while the bucket's layout
    (signature) stays the same; DDP rebuilds buckets after iteration 1."""

    def __init__(self, signature, tensors: dict):
        self.signature = signature
        self.t = tensors


class Int8CompressionState:
    """State of :func:`int8_compress_hook`: configuration, error-feedback
    residuals, counters and the process groups of the pipeline stages.

    Construct it on every rank at the same point of the program (it creates
    process groups) and register it once per DDP model::

        state = Int8CompressionState()
        ddp_model.register_comm_hook(state, int8_compress_hook)

    Args:
        process_group: the group DDP averages over (default: WORLD). Backend
            ``gloo`` (CPU tensors) or ``nccl``.
        block_size: elements per quantisation block (one fp32 scale each), a
            positive multiple of 32 up to 4096.
        error_feedback: keep what quantisation dropped and add it to the next
            step's gradient (two residuals: the rank's bucket, fp32, and the
            shard it owns, fp32; in hierarchical mode also the bf16 cast's).
        stochastic_rounding: round stochastically (unbiased) instead of to
            nearest; the random streams are keyed by ``seed`` + rank and a
            counter saved in :meth:`state_dict`.
        start_iter: iterations (counted by ``bucket.is_last()``) that use a plain
            full-precision allreduce first; 2 lets DDP rebuild its buckets.
        hierarchical: ``"auto"`` (on when ``LOCAL_WORLD_SIZE`` from torchrun
            splits WORLD into several nodes of several ranks), ``True`` (the
            same, but an error if it cannot), ``False``, or an int: ranks per node.
        min_compress_numel: buckets smaller than this go through a plain
            allreduce (two latency-bound collectives cost more than they save).
        seed: base seed of stochastic rounding.
        record_timeline: append ``(time.perf_counter(), event, bucket_index,
            iteration)`` tuples to ``self.timeline`` (events: ``"hook"`` when DDP
            hands over a bucket, ``"sent"`` when its first collective completes,
            ``"done"`` when the averaged bucket is ready). For benchmarks.

    Checkpoints: :meth:`state_dict` also saves the bucket layout the residuals
    belong to, each bucket as a list of ``(stable key, shape)`` pairs, one per
    parameter (the key: the parameter's position among the buckets of this
    state's first iteration; with DDP's defaults that is its place in DDP's
    single first-iteration bucket, which follows the model's parameter order
    and so is the same in every run of the same model). A fresh DDP
    built on resume hands its first iteration over as that single bucket,
    before rebuilding the saved layout; the hook then *replays* the saved
    layout: it averages each saved bucket inside it as its own bucket, in
    saved order, with that bucket's residuals and random offsets, so the
    resumed run continues bit-identically. A bucket that neither equals its
    saved bucket nor is made of whole saved buckets (another model, another
    parameter order) drops the loaded residuals with one warning.
    ``replayed_buckets`` counts the saved buckets averaged that way and
    ``layout_resets`` the residuals dropped.
    """

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        block_size: int = 256,
        error_feedback: bool = True,
        stochastic_rounding: bool = False,
        start_iter: int = 2,
        hierarchical: Union[bool, int, str] = "auto",
        min_compress_numel: int = 1 << 16,
        seed: int = 0,
        record_timeline: bool = False,
    ):
        if not isinstance(block_size, int) or block_size <= 0 or block_size % 32 or block_size > _MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be a positive multiple of 32 up to {_MAX_BLOCK_SIZE}, got {block_size!r}")
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        if not isinstance(min_compress_numel, int) or min_compress_numel < 0:
            raise ValueError(f"min_compress_numel must be an int >= 0, got {min_compress_numel!r}")
        if not (hierarchical in (True, False, "auto") or (type(hierarchical) is int and hierarchical > 0)):
            raise ValueError(f"hierarchical must be True, False, 'auto' or a positive int (ranks per node), "
                             f"got {hierarchical!r}")
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.start_iter = start_iter
        self.min_compress_numel = min_compress_numel
        self.seed = int(seed)
        self.hierarchical_request = hierarchical
        self.record_timeline = record_timeline
        self.timeline = []
        self.iteration = 0
        self.rng_offset = 0
        self._residuals = {}
        self.layout_resets = 0  # saved residuals dropped because a bucket's layout changed
        self.replayed_buckets = 0  # saved buckets averaged by layout replay (see the class docstring)
        # Layouts: a bucket is a tuple of (stable key, shape) pairs, one per parameter.
        self._param_keys = {}  # id(parameter) -> stable key, handed out in the first iteration
        self._key_refs = []  # key -> weak reference to its parameter (an id can be reused)
        self._keys_open = True
        self._layout_now = {}  # this iteration: bucket index -> its pairs (None: unknown)
        self._layout = None  # the last complete iteration's buckets, by index
        self._replay = None  # the loaded layout, until the live buckets match it
        self._replay_owner = {}  # (key, shape) -> the loaded bucket holding it
        self._replayed_now = False
        self._counters = Counters()
        self._bind(process_group)

    # ---- process groups

    def _bind(self, process_group) -> None:
        group = check_process_group(process_group, "Int8CompressionState")
        self.process_group = group
        self.world_size = group.size()
        self.rank = group.rank()
        backend = str(dist.get_backend(group))
        ranks = dist.get_process_group_ranks(group)
        local = self._local_world_size(group)
        self.hierarchical = local is not None
        self._seq = itertools.count()
        if self.world_size == 1:
            self._stage_groups, self._launchers = [], []
        elif not self.hierarchical:
            self.local_world_size, self.num_nodes = self.world_size, 1
            # Stage 0 (all_to_all) runs on the user's group from the hook; stage 1 on its own.
            self._stage_groups = [group, _new_group(ranks, backend)]
        else:
            L, M = local, self.world_size // local
            self.local_world_size, self.num_nodes = L, M
            node, local_rank = divmod(self.rank, L)
            intra = [ranks[node * L + j] for j in range(L)]
            inter = [ranks[m * L + local_rank] for m in range(M)]
            # intra a2a (bf16) | inter a2a (int8) | inter all-gather | intra all-gather
            self._stage_groups = [_new_group(intra, backend), _new_group(inter, backend),
                                  _new_group(inter, backend), _new_group(intra, backend)]
        self._launchers = [None] + [OrderedLauncher() for _ in self._stage_groups[1:]]

    def _local_world_size(self, group) -> Optional[int]:
        """Ranks per node when hierarchical mode applies, else None."""
        req = self.hierarchical_request
        if req is False or self.world_size == 1:
            return None
        if type(req) is int:
            local = req
        else:  # torchrun's LOCAL_WORLD_SIZE counts WORLD's ranks per node
            env = os.environ.get("LOCAL_WORLD_SIZE")
            local = int(env) if env and group is dist.group.WORLD else None
        usable = local is not None and 1 < local < self.world_size and self.world_size % local == 0
        if usable:
            return local
        if req is True or type(req) is int:
            raise ValueError(
                f"hierarchical={req!r} needs ranks per node (LOCAL_WORLD_SIZE={local}) strictly between 1 "
                f"and the world size {self.world_size} and dividing it")
        return None

    # ---- stats and checkpoints

    def stats(self) -> dict:
        """Counters as plain Python numbers (no device synchronisation):
        ``hook_calls`` (buckets DDP handed over), ``compressed_calls`` and
        ``allreduce_calls`` (buckets averaged each way; they add up to
        ``hook_calls`` except while a resumed run replays a saved layout,
        where one DDP bucket is averaged as the saved buckets it holds),
        ``bytes_sent`` (what this rank sent, all stages), ``bytes_sent_inter_node``
        (hierarchical mode: the part sent to other nodes; flat: equal to
        ``bytes_sent``), ``bytes_fp32_equivalent`` (an fp32 ring allreduce of
        the same buckets), ``compression_ratio`` (fp32 bytes / our bytes),
        ``hook_time_s`` (host time in the hook and its callbacks) and
        ``iteration``."""
        out = self._counters.snapshot()
        out["iteration"] = self.iteration
        return out

    def state_dict(self) -> dict:
        """Residuals (cloned), the bucket layout they belong to, the iteration
        and RNG counters, the counters and the configuration. The process
        group is not saved."""
        return {
            "version": _STATE_DICT_VERSION,
            "config": {"block_size": self.block_size, "error_feedback": self.error_feedback,
                       "stochastic_rounding": self.stochastic_rounding, "start_iter": self.start_iter,
                       "min_compress_numel": self.min_compress_numel, "seed": self.seed,
                       "hierarchical": self.hierarchical, "world_size": self.world_size},
            "iteration": self.iteration,
            "rng_offset": self.rng_offset,
            "counters": self._counters.snapshot(),
            "residuals": {idx: {"signature": r.signature, "tensors": {k: t.clone() for k, t in r.t.items()}}
                          for idx, r in self._residuals.items()},
            "layout": None if self._layout is None else [[[k, list(shape)] for k, shape in bucket]
                                                         for bucket in self._layout],
        }

    def load_state_dict(self, state_dict: dict, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """Restore what :meth:`state_dict` saved. ``process_group`` re-binds the
        state to a group of this run (its pipeline groups are created again);
        None keeps the current one. Residuals saved with another world size
        or mode are dropped (they would not fit the shards). Load before the
        first backward of the new DDP: its first buckets are then matched
        against the saved layout (see the class docstring)."""
        if state_dict.get("version") not in (1, _STATE_DICT_VERSION):
            raise ValueError(f"state_dict version must be 1 or {_STATE_DICT_VERSION}, "
                             f"got {state_dict.get('version')!r}")
        cfg = state_dict["config"]
        if process_group is not None:
            self._bind(process_group)
        for key in ("block_size", "error_feedback", "stochastic_rounding", "start_iter", "min_compress_numel", "seed"):
            setattr(self, key, cfg[key])
        self.iteration = int(state_dict["iteration"])
        self.rng_offset = int(state_dict["rng_offset"])
        self._counters.load(state_dict["counters"])
        self._residuals = {}
        self._layout, self._layout_now, self._replay, self._replay_owner = None, {}, None, {}
        if cfg["world_size"] == self.world_size and cfg["hierarchical"] == self.hierarchical:
            for idx, r in state_dict["residuals"].items():
                self._residuals[int(idx)] = _BucketResiduals(
                    tuple(r["signature"]) if isinstance(r["signature"], list) else r["signature"],
                    {k: t.clone() for k, t in r["tensors"].items()})
            if state_dict.get("layout") is not None:
                self._layout = self._replay = [tuple((int(k), tuple(int(d) for d in shape)) for k, shape in bucket)
                                               for bucket in state_dict["layout"]]
                self._replay_owner = {entry: j for j, bucket in enumerate(self._replay) for entry in bucket}

    # ---- bucket layouts

    def _layout_keys(self, params) -> Optional[tuple]:
        """A bucket's parameters as ``(stable key, shape)`` pairs (None when the
        bucket names no parameters, or one that this state's first iteration
        did not)."""
        if not params:
            return None
        if self._keys_open:
            for p in params:
                k = self._param_keys.get(id(p))
                if k is None or self._key_refs[k]() is not p:
                    self._param_keys[id(p)] = len(self._key_refs)
                    self._key_refs.append(weakref.ref(p))
        keys = []
        for p in params:
            k = self._param_keys.get(id(p))
            if k is None or self._key_refs[k]() is not p:
                return None
            keys.append((k, tuple(p.shape)))
        return tuple(keys)

    def _replay_plan(self, idx: int, keys: Optional[tuple]) -> Optional[list]:
        """The loaded buckets to average in place of live bucket ``idx`` (their
        indices, in saved order), or None for the normal path. Every rank
        has the same buckets (DDP agrees on them), so every rank decides alike."""
        saved = self._replay
        if saved is None:
            return None
        if keys is None:
            reason = f"bucket {idx}'s parameters are unknown to this state (not seen in its first iteration)"
        elif idx < len(saved) and keys == saved[idx]:
            return None
        else:
            held = {self._replay_owner.get(k) for k in keys}
            if None not in held and sum(len(saved[j]) for j in held) == len(keys):
                return sorted(held)
            reason = (f"bucket {idx} ({len(keys)} parameters) is neither saved bucket {idx} nor made of "
                      f"whole saved buckets with the same parameter shapes")
        warnings.warn(f"Int8CompressionState: the bucket layout saved in the loaded state does not fit this run "
                      f"({reason}; another model, parameter order or DDP bucketing?): the loaded "
                      f"error-feedback residuals are reset", RuntimeWarning, stacklevel=3)
        self.layout_resets += len(self._residuals)
        self._residuals, self._replay = {}, None
        return None

    def _end_iteration(self) -> None:
        """After the bucket with ``is_last()``: keep the iteration's layout;
        the loaded one is done with once an iteration needed no replay."""
        n = len(self._layout_now)
        layout = [self._layout_now.get(i) for i in range(n)]
        self._layout = layout if n and all(keys is not None for keys in layout) else None
        self._layout_now, self._keys_open = {}, False
        if not self._replayed_now:
            self._replay = None
        self._replayed_now = False

    # ---- residuals

    def _bucket_residuals(self, idx: int, signature, specs: dict) -> dict:
        """Residual tensors of bucket ``idx`` (zeros when new or re-laid out).
        specs: name -> (numel, device)."""
        r = self._residuals.get(idx)
        if r is None or r.signature != signature or any(
                r.t[k].numel() != n or r.t[k].device != d for k, (n, d) in specs.items()):
            if r is not None:
                self.layout_resets += 1
            r = _BucketResiduals(signature, {k: torch.zeros(n, dtype=torch.float32, device=d)
                                             for k, (n, d) in specs.items()})
            self._residuals[idx] = r
        return r.t

    def _mark(self, event: str, idx: int, iteration: int) -> None:
        if self.record_timeline:
            self.timeline.append((time.perf_counter(), event, idx, iteration))


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
    send = _Packed(1, shard, bs, device)
    send.fill(q, s)
    out = _Packed(ranks, shard, bs, device)
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
            with HostTimer(self.state._counters):
                fut, payload = self.stages[k](payload)
        except BaseException as e:  # noqa: BLE001 -- must reach the future, or DDP waits forever
            self._fail(k, e)
            return
        fut.then(lambda f: self._done(k, f, payload))

    def _done(self, k: int, fut, payload) -> None:
        try:
            fut.value()  # raises what the collective raised (peer gone, timeout)
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
    last collective's callback completes with the averaged gradients (a new
    tensor shaped like ``bucket.buffer()``, which DDP copies into the grads;
    the full-precision path and layout replay average ``bucket.buffer()`` in
    place). ``bucket`` needs ``buffer()``, ``index()`` and ``is_last()`` (and,
    optionally, ``parameters()`` and ``gradients()``), as
    ``torch.distributed.GradBucket`` has.
    """
    t0 = time.perf_counter()
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
    if p == 1 or iteration < state.start_iter or n < state.min_compress_numel:
        sent = ring_allreduce_bytes(n, p, buffer.element_size())
        state._counters.add(allreduce_calls=1, bytes_sent=sent, bytes_sent_inter_node=sent,
                            bytes_fp32_equivalent=fp32_bytes)
        return _allreduce_mean(buffer, state.process_group) if p > 1 else completed_future(buffer)
    build = _hierarchical_stages if state.hierarchical else _flat_stages
    stages, finish, sent, inter = build(state, buffer, idx, signature)
    state._counters.add(compressed_calls=1, bytes_sent=sent, bytes_sent_inter_node=inter,
                        bytes_fp32_equivalent=fp32_bytes)
    return _Pipeline(state, next(state._seq), idx, iteration, buffer, stages, finish).start()


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


def _flat_stages(state, buffer, idx, signature):
    p, bs, n = state.world_size, state.block_size, buffer.numel()
    npad = _round_up(n, p * bs)
    shard = npad // p
    device = buffer.device
    res = state._bucket_residuals(idx, signature,
                                  {"bucket": (n, device), "shard": (shard, device)})
    off1, off2 = state.rng_offset, state.rng_offset + npad
    state.rng_offset += npad + shard
    g1, g2 = state._stage_groups

    def all_to_all(_):
        q, s = _quantize(state, buffer, res["bucket"], off1)
        send = _Packed(p, shard, bs, device)
        send.fill(q.view(-1), s)
        recv = _Packed(p, shard, bs, device)
        return dist.all_to_all_single(recv.buf, send.buf, group=g1, async_op=True).get_future(), recv

    def all_gather(recv):
        return _gather_requantized_mean(state, recv, res["shard"], off2, p, shard, g2)

    def finish(gathered):
        deq = ops.dequantize_int8(gathered.q.reshape(-1), gathered.scales.reshape(-1), bs, buffer.dtype, npad)
        return deq[:n]  # DDP copies the hook's result into the gradients; no copy into the bucket first

    packed = 2 * (p - 1) * (shard + 4 * (shard // bs))
    return [all_to_all, all_gather], finish, packed, packed


def _hierarchical_stages(state, buffer, idx, signature):
    L, M, bs, n = state.local_world_size, state.num_nodes, state.block_size, buffer.numel()
    p = L * M
    npad = _round_up(n, p * bs)
    part = npad // L       # this local rank's share of the node sum
    sub = part // M        # the piece of it this rank owns between nodes
    device = buffer.device
    wire = buffer.dtype if buffer.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    res = state._bucket_residuals(idx, signature, {
        "cast": (n, device), "part": (part, device), "shard": (sub, device)})
    off1, off2 = state.rng_offset, state.rng_offset + part
    state.rng_offset += part + sub
    g_intra, g_inter_a, g_inter_b, g_intra_b = state._stage_groups

    def intra_reduce_scatter(_):
        # bf16 (or the bucket's 16-bit type) with its own error feedback.
        y = buffer.float()
        if state.error_feedback:
            y += res["cast"]
        send = torch.zeros(npad, dtype=wire, device=device)
        send[:n] = y
        if state.error_feedback:
            res["cast"].copy_(y - send[:n].float())
        recv = torch.empty(L, part, dtype=wire, device=device)
        return dist.all_to_all_single(recv, send, group=g_intra, async_op=True).get_future(), recv

    def inter_all_to_all(recv):
        node_sum = recv.float().sum(0)
        q, s = _quantize(state, node_sum, res["part"], off1)
        send = _Packed(M, sub, bs, device)
        send.fill(q, s)
        out = _Packed(M, sub, bs, device)
        return dist.all_to_all_single(out.buf, send.buf, group=g_inter_a, async_op=True).get_future(), out

    def inter_all_gather(recv):
        return _gather_requantized_mean(state, recv, res["shard"], off2, M, sub, g_inter_b)

    def intra_all_gather(gathered):
        out = torch.empty(L * gathered.buf.numel(), dtype=torch.uint8, device=device)
        fut = dist.all_gather_into_tensor(out, gathered.buf.view(-1), group=g_intra_b, async_op=True)
        return fut.get_future(), _Packed(L * M, sub, bs, device, buf=out)

    def finish(everything):
        deq = ops.dequantize_int8(everything.q.reshape(-1), everything.scales.reshape(-1), bs, buffer.dtype, npad)
        return deq[:n]

    row = sub + 4 * (sub // bs)
    inter = 2 * (M - 1) * row
    intra = (L - 1) * part * torch.finfo(wire).bits // 8 + (L - 1) * M * row
    return [intra_reduce_scatter, inter_all_to_all, inter_all_gather, intra_all_gather], finish, inter + intra, inter


# ---- the baseline with the same accounting


class CountingAllreduceState:
    """State of :func:`counting_allreduce_hook`: DDP's default full-precision
    averaging allreduce, counting bytes like :class:`Int8CompressionState`
    (a ring allreduce sends ``2 * N * (p - 1) / p`` elements per rank), with
    the same :meth:`stats` keys."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None):
        self.process_group = check_process_group(process_group, "CountingAllreduceState")
        self.world_size = self.process_group.size()
        self.iteration = 0
        self._counters = Counters()

    def stats(self) -> dict:
        out = self._counters.snapshot()
        out["iteration"] = self.iteration
        return out

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "counters": self._counters.snapshot()}

    def load_state_dict(self, state_dict: dict, process_group: Optional[dist.ProcessGroup] = None) -> None:
        if process_group is not None:
            self.process_group = check_process_group(process_group, "CountingAllreduceState")
            self.world_size = self.process_group.size()
        self.iteration = int(state_dict["iteration"])
        self._counters.load(state_dict["counters"])


def counting_allreduce_hook(state: CountingAllreduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Plain averaging allreduce (what DDP does without a hook), counted."""
    t0 = time.perf_counter()
    buffer = bucket.buffer()
    if bucket.is_last():
        state.iteration += 1
    n, p = buffer.numel(), state.world_size
    sent = ring_allreduce_bytes(n, p, buffer.element_size())
    fut = _allreduce_mean(buffer, state.process_group) if p > 1 else completed_future(buffer)
    state._counters.add(hook_calls=1, allreduce_calls=1, bytes_sent=sent, bytes_sent_inter_node=sent,
                        bytes_fp32_equivalent=ring_allreduce_bytes(n, p, 4),
                        hook_time_s=time.perf_counter() - t0)
    return fut
