"""int8 gradient reduce-scatter for FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 reduce-scatters each unit's flat gradient, laid out ``[world, shard]``
(row ``j``: what rank ``j`` keeps), through a replaceable communication
(``FSDPModule.set_custom_reduce_scatter``, torch's ``ReduceScatter``
interface). :class:`Int8ReduceScatter` is one: per call ::

    rows = input.view(p, S), each padded to Spad (a multiple of block_size)
    q, s = quantize_int8_ef_(rows, residual)        # error feedback, per rank and unit
    all_to_all_single(int8 rows + fp32 scales)      # rank j receives everyone's row j
    output = dequantize_reduce_int8(.., multiplier) # sum x multiplier, in the reduce dtype

Each rank sends ``(p - 1) * Spad * (1 + 4 / block_size)`` bytes against
``4 * (p - 1) * S`` for an fp32 reduce-scatter (0.254x at block_size 256). The
multiplier is what FSDP's ``op`` asks for: ``1 / p`` for ``AVG``, 1 for ``SUM``
(FSDP then divides itself, as it does for fp16), and ``1 / factor`` for the
pre-multiplied sum that ``set_gradient_divide_factor(factor)`` selects.

:func:`enable_int8_reduce_scatter` installs it on every ``FSDPModule`` of a
model with one :class:`Int8ReduceScatterState`, which holds the residuals
(keyed by the qualified names of each unit's parameters), the counters and
the policy (the same cost model as the DDP hook: a unit whose int8 all-to-all
is not predicted faster goes through the plain reduce-scatter).
``int8_all_gather=True`` also installs :class:`Int8AllGather` (ZeRO++'s
quantised parameter all-gather) on every unit.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from deepseek_ext import ops
from deepseek_ext.distributed._packed import Packed, round_up
from deepseek_ext.distributed._pipeline import SUPPORTED_BACKENDS
from deepseek_ext.distributed._policy import calibrate, check_policy, compress_wins

__all__ = ["Int8ReduceScatterState", "Int8ReduceScatter", "Int8AllGather", "enable_int8_reduce_scatter"]

_MAX_BLOCK_SIZE = 4096
_STATE_DICT_VERSION = 1


class Int8ReduceScatterState:
    """Configuration, error-feedback residuals, counters and policy shared by the
    :class:`Int8ReduceScatter` of every unit of a model. It needs no process
    group when built: it binds to the group FSDP reduce-scatters over on the
    first call.

    Args:
        block_size: elements per quantisation block (one fp32 scale each), a
            positive multiple of 32 up to 4096.
        error_feedback: keep what quantisation dropped from each rank's
            gradient and add it to the next step's (one fp32 residual per unit
            and rank, the size of the unit's padded gradient).
        min_compress_numel: reduce-scatters of fewer elements (the whole
            ``[world, shard]`` input) use the plain collective.
        policy: ``"auto"`` (calibrate once, compress a unit only when int8 is
            predicted faster; see :mod:`deepseek_ext.distributed._policy`) or
            ``"always"``.
        link_bandwidth: bits per second of the slowest link, a hint that
            replaces the measured bandwidth in the ``"auto"`` policy.
    """

    def __init__(self, block_size: int = 256, error_feedback: bool = True, min_compress_numel: int = 1 << 16,
                 policy: str = "auto", link_bandwidth: Optional[float] = None):
        if not isinstance(block_size, int) or block_size <= 0 or block_size % 32 or block_size > _MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be a positive multiple of 32 up to {_MAX_BLOCK_SIZE}, "
                             f"got {block_size!r}")
        if not isinstance(min_compress_numel, int) or min_compress_numel < 0:
            raise ValueError(f"min_compress_numel must be an int >= 0, got {min_compress_numel!r}")
        check_policy(policy, link_bandwidth)
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)
        self.min_compress_numel = min_compress_numel
        self.policy = policy
        self.link_bandwidth = None if link_bandwidth is None else float(link_bandwidth)
        self.calibration = None
        self.residuals: Dict[str, torch.Tensor] = {}
        self.decisions: Dict[str, str] = {}
        self.layout_resets = 0
        self._lock = threading.Lock()
        self._counters = {"calls": 0, "compressed_calls": 0, "plain_calls": 0, "policy_plain_calls": 0,
                          "bytes_sent": 0, "bytes_fp32_equivalent": 0,
                          "ag_calls": 0, "ag_compressed_calls": 0, "ag_bytes_sent": 0, "ag_bytes_fp32_equivalent": 0}

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counters[k] += v

    def stats(self) -> dict:
        """Plain Python numbers: ``calls`` (reduce-scatters), ``compressed_calls``,
        ``plain_calls`` (below ``min_compress_numel`` or not worth it),
        ``policy_plain_calls`` (those the policy sent plain), ``bytes_sent``
        (by this rank), ``bytes_fp32_equivalent`` (an fp32 reduce-scatter of
        the same inputs), ``compression_ratio`` (their quotient),
        ``calibration`` and ``decisions`` (unit key -> ``"int8"`` or ``"plain"``;
        ``<key>:all_gather`` for the parameter all-gathers). With
        ``int8_all_gather``: ``ag_calls``, ``ag_compressed_calls``,
        ``ag_bytes_sent`` and ``ag_bytes_fp32_equivalent`` count the
        parameter all-gathers the same way."""
        with self._lock:
            out = dict(self._counters)
        out["compression_ratio"] = out["bytes_fp32_equivalent"] / out["bytes_sent"] if out["bytes_sent"] else 1.0
        out["calibration"] = None if self.calibration is None else dict(self.calibration)
        out["decisions"] = dict(self.decisions)
        return out

    def state_dict(self) -> dict:
        """Residuals (cloned) by unit key, counters, calibration and configuration:
        a run restarted from it (same model, world size and units) continues
        bit-identically."""
        return {"version": _STATE_DICT_VERSION,
                "config": {"block_size": self.block_size, "error_feedback": self.error_feedback,
                           "min_compress_numel": self.min_compress_numel, "policy": self.policy,
                           "link_bandwidth": self.link_bandwidth},
                "calibration": None if self.calibration is None else dict(self.calibration),
                "counters": self.stats(),
                "residuals": {k: t.clone() for k, t in self.residuals.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != _STATE_DICT_VERSION:
            raise ValueError(f"state_dict version must be {_STATE_DICT_VERSION}, got {state_dict.get('version')!r}")
        for k, v in state_dict["config"].items():
            setattr(self, k, v)
        cal = state_dict["calibration"]
        self.calibration = None if cal is None else dict(cal)
        with self._lock:
            for k in self._counters:
                self._counters[k] = state_dict["counters"].get(k, 0)
        self.residuals = {k: t.clone() for k, t in state_dict["residuals"].items()}

    def _residual(self, key: str, numel: int, device) -> torch.Tensor:
        r = self.residuals.get(key)
        if r is None or r.numel() != numel or r.device != device:
            if r is not None:
                self.layout_resets += 1
            r = torch.zeros(numel, dtype=torch.float32, device=device)
            self.residuals[key] = r
        return r


class Int8ReduceScatter(ReduceScatter):
    """torch's FSDP2 ``ReduceScatter`` interface, sent as int8 (see the module
    docstring). ``key`` names the unit's residual in ``state``; ``module`` (the
    ``FSDPModule``) gives the divide factor of ``set_gradient_divide_factor``."""

    def __init__(self, state: Int8ReduceScatterState, key: str, module=None):
        self.state, self.key, self.module = state, key, module

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _multiplier(self, op, p: int) -> float:
        if op == dist.ReduceOp.AVG:
            return 1.0 / p
        if op == dist.ReduceOp.SUM:
            return 1.0
        factor = None
        if self.module is not None:
            group = self.module._get_fsdp_state()._fsdp_param_group
            factor = None if group is None else group.gradient_divide_factor
        if factor is None:
            raise ValueError(f"Int8ReduceScatter: op must be SUM, AVG or the pre-multiplied sum of "
                             f"set_gradient_divide_factor, got {op!r} with no divide factor set")
        return 1.0 / factor

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op=dist.ReduceOp.SUM, async_op: bool = False):
        st, p, bs = self.state, group.size(), self.state.block_size
        n = input_tensor.numel()
        if n != p * output_tensor.numel():
            raise ValueError(f"Int8ReduceScatter: input_tensor must have world size ({p}) x output_tensor's "
                             f"{output_tensor.numel()} elements, got {n}")
        backend = str(dist.get_backend(group)).lower()
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(f"process_group backend must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
        shard = n // p
        spad = round_up(shard, bs)
        int8_bytes = (p - 1) * (spad + 4 * (spad // bs))
        plain_bytes = (p - 1) * shard * input_tensor.element_size()
        compress = p > 1 and n >= st.min_compress_numel
        if compress and st.policy == "auto":
            if st.calibration is None:
                st.calibration = calibrate(group, input_tensor.device, bs, 1 << 22, st.link_bandwidth)
            compress = compress_wins(st.calibration, n, plain_bytes, 1, int8_bytes, 1)
            st.decisions[self.key] = "int8" if compress else "plain"
            if not compress:
                st._count(policy_plain_calls=1)
        fp32_bytes = (p - 1) * shard * 4
        if not compress:
            st._count(calls=1, plain_calls=1, bytes_sent=plain_bytes, bytes_fp32_equivalent=fp32_bytes)
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        mult = self._multiplier(op, p)
        rows = input_tensor.view(p, shard)
        if spad != shard:  # quantisation blocks must not straddle two ranks' rows
            padded = torch.zeros(p, spad, dtype=input_tensor.dtype, device=input_tensor.device)
            padded[:, :shard] = rows
            rows = padded
        flat = rows.reshape(-1)
        if st.error_feedback:
            q, s = ops.quantize_int8_ef_(flat, st._residual(self.key, p * spad, flat.device), bs, False, 0, 0)
        else:
            q, s = ops.quantize_int8(flat, bs, False, 0, 0)
        send = Packed(p, spad, bs, flat.device)
        send.fill(q, s)
        recv = Packed(p, spad, bs, flat.device)
        dist.all_to_all_single(recv.buf, send.buf, group=group)
        reduced = ops.dequantize_reduce_int8(recv.q, recv.scales, bs, mult, output_tensor.dtype)
        output_tensor.copy_(reduced[:shard])
        st._count(calls=1, compressed_calls=1, bytes_sent=int8_bytes, bytes_fp32_equivalent=fp32_bytes)
        return None


class Int8AllGather(AllGather):
    """torch's FSDP2 ``AllGather`` interface, sent as blockwise int8 (ZeRO++'s
    quantised weights): each rank quantises its shard of the parameters
    (round to nearest, no error feedback: the sharded fp32 parameters the
    optimizer updates stay exact), all-gathers int8 values and scales, and
    every rank dequantises all of them, its own shard included, so that every
    rank computes with the same unsharded parameters. Inputs that are not
    float32, float16 or bfloat16 (FSDP gathers mixed dtypes as bytes) and
    small or not-worth-it ones (the state's policy) use the plain all-gather.
    It runs to completion before returning (``async_op`` is honoured only on
    the plain path)."""

    def __init__(self, state: Int8ReduceScatterState, key: str):
        self.state, self.key = state, key

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False):
        st, p, bs = self.state, group.size(), self.state.block_size
        n = input_tensor.numel()
        if output_tensor.numel() != p * n:
            raise ValueError(f"Int8AllGather: output_tensor must have world size ({p}) x input_tensor's {n} "
                             f"elements, got {output_tensor.numel()}")
        npad = round_up(n, bs)
        int8_bytes = (p - 1) * (npad + 4 * (npad // bs))
        plain_bytes = (p - 1) * n * input_tensor.element_size()
        compress = (p > 1 and p * n >= st.min_compress_numel
                    and input_tensor.dtype in (torch.float32, torch.float16, torch.bfloat16))
        if compress and st.policy == "auto":
            if st.calibration is None:
                st.calibration = calibrate(group, input_tensor.device, bs, 1 << 22, st.link_bandwidth)
            compress = compress_wins(st.calibration, p * n, plain_bytes, 1, int8_bytes, 1)
            st.decisions[self.key + ":all_gather"] = "int8" if compress else "plain"
        if not compress:
            st._count(ag_calls=1, ag_bytes_sent=plain_bytes, ag_bytes_fp32_equivalent=(p - 1) * n * 4)
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        x = input_tensor.reshape(-1)
        if npad != n:
            x = torch.cat([x, x.new_zeros(npad - n)])
        q, s = ops.quantize_int8(x, bs, False, 0, 0)
        send = Packed(1, npad, bs, x.device)
        send.fill(q, s)
        out = Packed(p, npad, bs, x.device)
        # FSDP's input is a view into output_tensor (this rank's slice): quantised
        # above, before the output is written.
        dist.all_gather_into_tensor(out.buf.view(-1), send.buf.view(-1), group=group)
        full = ops.dequantize_int8(out.q.reshape(-1), out.scales.reshape(-1), bs, output_tensor.dtype, p * npad)
        output_tensor.view(p, n).copy_(full.view(p, npad)[:, :n])
        st._count(ag_calls=1, ag_compressed_calls=1, ag_bytes_sent=int8_bytes,
                  ag_bytes_fp32_equivalent=(p - 1) * n * 4)
        return None


def enable_int8_reduce_scatter(model: torch.nn.Module, state: Optional[Int8ReduceScatterState] = None,
                               int8_all_gather: bool = False, **state_kwargs) -> Int8ReduceScatterState:
    """Installs an :class:`Int8ReduceScatter` on every ``FSDPModule`` of ``model``
    (after ``fully_shard``), all sharing ``state`` (default: a new
    :class:`Int8ReduceScatterState` built from ``state_kwargs``); returns the
    state. Each unit's residual is keyed by the qualified names of its
    parameters in ``model``, so a restarted run finds its residuals again.
    ``int8_all_gather=True`` also gathers the parameters as int8
    (:class:`Int8AllGather`; the optimizer's sharded parameters stay exact)."""
    from torch.distributed.fsdp import FSDPModule

    if state is None:
        state = Int8ReduceScatterState(**state_kwargs)
    elif state_kwargs:
        raise ValueError("give either state or state_kwargs, not both")
    names = {id(m): name for name, m in model.named_modules()}
    installed = 0
    for _, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        params = []
        for fp in group.fsdp_params:
            owner = names.get(id(fp._module_info.module))
            params.append(fp._module_info.param_name if not owner else f"{owner}.{fp._module_info.param_name}")
        key = ",".join(params)
        module.set_custom_reduce_scatter(Int8ReduceScatter(state, key, module))
        if int8_all_gather:
            module.set_custom_all_gather(Int8AllGather(state, key))
        installed += 1
    if not installed:
        raise ValueError(f"model ({type(model).__name__}) has no FSDPModule with parameters: "
                         "call torch.distributed.fsdp.fully_shard on it first")
    return state
