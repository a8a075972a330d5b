"""State of the int8 DDP communication hook (:mod:`.int8_hook`): configuration,
error-feedback residuals keyed by bucket, the bucket layouts that checkpoints
replay, counters, and the process groups of the pipeline stages."""

import itertools
import os
import time
import warnings
import weakref
from typing import Optional, Union

import torch
import torch.distributed as dist

from deepseek_ext.distributed._pipeline import Counters, OrderedLauncher, check_process_group, ring_allreduce_bytes
from deepseek_ext.distributed._policy import check_policy, compress_wins

__all__ = ["Int8CompressionState"]

_MAX_BLOCK_SIZE = 4096
_STATE_DICT_VERSION = 3  # 2: adds "layout"; 3: adds "calibration" (older versions still load)


def _new_group(ranks, backend):
    # Only the members take part (use_local_synchronization), so each node can
    # create its own groups; they must still do it in the same order.
    return dist.new_group(ranks=ranks, backend=backend, use_local_synchronization=True)


class _BucketResiduals:
    """Error-feedback memory of one bucket: valid while the bucket's layout
    (signature) stays the same; DDP rebuilds buckets after iteration 1."""

    def __init__(self, signature, tensors: dict):
        self.signature = signature
        self.t = tensors


class Int8CompressionState:
    """State of :func:`int8_compress_hook`: configuration, error-feedback
    residuals, counters and the process groups of the pipeline stages.

    Construct it on every rank and register it once per DDP model. It binds
    its process group (and creates the groups of its pipeline stages) when
    constructed if ``torch.distributed`` is initialised, else at the first
    hook call, as torch's ``PowerSGDState(process_group=None)`` does: it can
    be built before ``init_process_group`` (Lightning's
    ``DDPStrategy(ddp_comm_state=...)``)::

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
        policy: ``"auto"`` (default): compress a bucket only when the cost
            model (see below) predicts that int8 is faster than a plain
            allreduce of it; ``"always"``: compress every bucket of at least
            ``min_compress_numel`` elements.
        link_bandwidth: bits per second of the slowest link between ranks, a
            hint that replaces the measured one in the ``"auto"`` policy
            (e.g. ``1e9`` for 1 Gbit/s); None measures it.
        chunk_numel: buckets larger than this are sent as chunks of about
            this many elements, each its own all-to-all and all-gather, so
            that quantising one chunk overlaps sending another and several
            transfers are in flight at once.
        record_timeline: append ``(time.perf_counter(), event, bucket_index,
            iteration)`` tuples to ``self.timeline`` (events: ``"hook"`` when DDP
            hands over a bucket, ``"sent"`` when its first collective completes,
            ``"done"`` when the averaged bucket is ready). For benchmarks.

    Policy (``"auto"``): at the first hook call of iteration ``start_iter``
    every rank calibrates once, with blocking collectives on the group: the
    latency ``a`` of a one-element allreduce, the seconds per byte ``b`` of a
    4 MB allreduce (or ``8 / link_bandwidth``), and the seconds per element
    ``c`` of this hook's quantise / dequantise-reduce / re-quantise /
    dequantise ops on this rank's device. The ranks take the maximum of each
    (one more allreduce), so every rank holds the same numbers and decides
    every bucket alike. A bucket of ``N`` elements is then compressed iff
    ``2 a + b * int8_bytes + c * N < 0.8 * (a + b * allreduce_bytes)`` (compute
    counted as if it did not overlap the transfers; the 0.8 a margin for the
    model's error), else averaged by a plain allreduce. :meth:`stats` gives the numbers and each bucket's decision.

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
        policy: str = "auto",
        link_bandwidth: Optional[float] = None,
        chunk_numel: int = 1 << 22,
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
        check_policy(policy, link_bandwidth)
        if not isinstance(chunk_numel, int) or chunk_numel < block_size:
            raise ValueError(f"chunk_numel must be an int >= block_size ({block_size}), got {chunk_numel!r}")
        self.policy = policy
        self.link_bandwidth = None if link_bandwidth is None else float(link_bandwidth)
        self.chunk_numel = chunk_numel
        self.calibration = None  # {"latency_s", "s_per_byte", "s_per_element"} once measured
        self._decisions = {}  # bucket index -> "int8" or "allreduce" (the latest decision)
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
        # Bound now when the process group exists, else on first use (as torch's
        # PowerSGDState(process_group=None) is): frameworks such as Lightning build
        # the hook's state before they initialise torch.distributed.
        self._requested_group = process_group
        self.process_group, self.world_size, self.rank, self.hierarchical = None, None, None, None
        self._pending_load = None
        if dist.is_available() and dist.is_initialized():
            self._bind(process_group)

    # ---- process groups

    def _ensure_bound(self) -> None:
        """Binds to the requested group (WORLD for None) on first use; every
        rank's first hook call is the same bucket, so the pipeline groups are
        created in the same order everywhere."""
        if self.process_group is None:
            self._bind(self._requested_group)

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
        if self.world_size == 1 and self.policy != "always":
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
        if self._pending_load is not None:
            pending, self._pending_load = self._pending_load, None
            self.load_state_dict(pending)

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
        ``hook_time_s`` (host time in the hook and its callbacks),
        ``policy_allreduce_calls`` (buckets the ``"auto"`` policy sent as a
        plain allreduce because int8 would not have been faster),
        ``iteration``, ``calibration`` (the policy's agreed numbers, None
        before it calibrated) and ``decisions`` (bucket index -> ``"int8"``
        or ``"allreduce"``, the latest decision for each bucket)."""
        out = self._counters.snapshot()
        out["iteration"] = self.iteration
        out["calibration"] = None if self.calibration is None else dict(self.calibration)
        out["decisions"] = dict(self._decisions)
        return out

    # ---- the policy

    def _compress_wins(self, n: int, element_size: int, int8_bytes: int) -> bool:
        """Whether the "auto" policy compresses a bucket of n elements (the same
        answer on every rank: the calibration is agreed)."""
        return compress_wins(self.calibration, n, ring_allreduce_bytes(n, self.world_size, element_size), 1,
                             int8_bytes, 2)

    def state_dict(self) -> dict:
        """Residuals (cloned), the bucket layout they belong to, the iteration
        and RNG counters, the counters and the configuration. The process
        group is not saved."""
        return {
            "version": _STATE_DICT_VERSION,
            "config": {"block_size": self.block_size, "error_feedback": self.error_feedback,
                       "stochastic_rounding": self.stochastic_rounding, "start_iter": self.start_iter,
                       "min_compress_numel": self.min_compress_numel, "seed": self.seed,
                       "hierarchical": self.hierarchical, "world_size": self.world_size,
                       "policy": self.policy, "link_bandwidth": self.link_bandwidth,
                       "chunk_numel": self.chunk_numel},
            "calibration": None if self.calibration is None else dict(self.calibration),
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
        None keeps the current one (a state not bound yet, before
        ``init_process_group``, applies it when it binds). Residuals saved with another world size
        or mode are dropped (they would not fit the shards). Load before the
        first backward of the new DDP: its first buckets are then matched
        against the saved layout (see the class docstring)."""
        if state_dict.get("version") not in (1, 2, _STATE_DICT_VERSION):
            raise ValueError(f"state_dict version must be 1, 2 or {_STATE_DICT_VERSION}, "
                             f"got {state_dict.get('version')!r}")
        cfg = state_dict["config"]
        if process_group is not None:
            self._requested_group = process_group
            self._bind(process_group)
        elif self.process_group is None:
            if not (dist.is_available() and dist.is_initialized()):
                self._pending_load = state_dict  # applied when the state binds its group
                return
            self._bind(self._requested_group)
        for key in ("block_size", "error_feedback", "stochastic_rounding", "start_iter", "min_compress_numel", "seed"):
            setattr(self, key, cfg[key])
        for key in ("policy", "link_bandwidth", "chunk_numel"):
            if key in cfg:
                setattr(self, key, cfg[key])
        # The saved decisions' numbers, so that a resumed run decides as the saved one would.
        cal = state_dict.get("calibration")
        self.calibration = None if cal is None else dict(cal)
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
