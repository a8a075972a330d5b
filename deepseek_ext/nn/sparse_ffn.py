"""Gated sparse FFN: a learned gate picks ~30% of the FFN's blocks per token and
only those are computed, forward and backward (block-sparse grouped GEMMs).

The hidden units of the FFN are cut into ``n_blocks`` blocks of ``block_size
= d_ff / n_blocks`` units. The first ``shared_blocks`` blocks are always computed (gate weight 1);
each token picks the top ``k = clamp(round(density * n_blocks), 1, n_blocks -
shared_blocks)`` of the other (routed) blocks by ``gate score + balancing
bias``, and a selected block's output is multiplied by its gate weight
``2 * sigmoid(score)`` (1 at a zero score), so the gate learns through that
product: no straight-through estimator.

Load balancing without an auxiliary loss (DeepSeek-V3,
https://arxiv.org/abs/2412.19437 section 2.1.2): the balancing bias is a buffer
that only affects the choice of blocks. It moves once per optimizer step,
``bias += balance_rate * sign(mean(count) - count)``, where ``count`` is the
number of (token, block) pairs each routed block received in the step's
forwards, summed over the data-parallel ranks. Forward never changes the bias:
in training mode it only adds the step's counts on the device, so a
recomputation under activation checkpointing routes exactly as the forward that
produced the loss did, and every micro-batch of an accumulated step routes with
the same bias. The update runs after ``optimizer.step()`` of any
``torch.optim`` optimizer that holds the module's parameters (a global
optimizer step post-hook; ``auto_balance=False`` turns it off) or when
:func:`update_balance` is called; the host never reads a count. Under
``torch.distributed`` the counts are all-reduced over ``balance_group``
(default: the world group) first, so every rank (DDP with or without
``broadcast_buffers``, FSDP2) keeps a bit-identical bias.

An optional auxiliary balance loss (``aux_loss_weight > 0``) is left in
:attr:`GatedSparseFFN.aux_loss` for the caller to add to the task loss, so that
it is reported separately.

The module is not TorchScript-scriptable (its routing and balancing state are
Python); use ``torch.compile`` or ``torch.export``, or the LibTorch module
``deepseek_ext::nn::GatedSparseFFN`` from C++.
"""

from __future__ import annotations

import math
import weakref
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from deepseek_ext import ops

__all__ = ["GatedSparseFFN", "ffn_flops", "update_balance", "DEFAULT_N_BLOCKS"]

_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "swiglu")
# The block count when neither n_blocks nor block_size is given: the quality
# ablation of benchmarks/quality_sparse_ffn.py (docs/sparse_ffn.md) at density
# 0.3, and wide enough blocks (d_ff / 16) for the grouped GEMMs to be
# compute-bound on a GPU.
DEFAULT_N_BLOCKS = 16


def _check_config(d_model: int, d_ff: int, n_blocks: Optional[int], block_size: Optional[int],
                  density: float, shared_blocks: int, activation: str) -> tuple[int, int, int]:
    """(n_blocks, block_size, k) of a configuration; ValueError naming the bad argument.

    The block count comes from ``n_blocks`` (block width ``d_ff / n_blocks``)
    or from ``block_size`` (``n_blocks = d_ff / block_size``); given both, they
    must agree; given neither, ``n_blocks = DEFAULT_N_BLOCKS``. k rounds half
    up, as ``std::llround`` in the C++ module does.
    """
    if d_model <= 0:
        raise ValueError(f"d_model must be positive, got {d_model}")
    if d_ff <= 0:
        raise ValueError(f"d_ff must be positive, got {d_ff}")
    if n_blocks is None and block_size is None:
        n_blocks = DEFAULT_N_BLOCKS
    if n_blocks is not None:
        if n_blocks <= 0:
            raise ValueError(f"n_blocks must be positive, got {n_blocks}")
        if d_ff % n_blocks != 0:
            raise ValueError(f"n_blocks must divide d_ff: d_ff = {d_ff}, n_blocks = {n_blocks}")
        if block_size is not None and block_size * n_blocks != d_ff:
            raise ValueError(f"n_blocks and block_size disagree: n_blocks * block_size must equal "
                             f"d_ff = {d_ff}, got n_blocks = {n_blocks}, block_size = {block_size}")
        block_size = d_ff // n_blocks
    else:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if d_ff % block_size != 0:
            raise ValueError(f"block_size must divide d_ff: d_ff = {d_ff}, block_size = {block_size}")
        n_blocks = d_ff // block_size
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f'activation must be "gelu", "gelu_tanh", "silu" or "swiglu", got "{activation}"')
    if not 0 <= shared_blocks < n_blocks:
        raise ValueError(f"shared_blocks must be in [0, n_blocks = {n_blocks}), got {shared_blocks}")
    k = min(max(math.floor(density * n_blocks + 0.5), 1), n_blocks - shared_blocks)
    return n_blocks, block_size, k


def ffn_flops(d_model: int, d_ff: int, *, n_blocks: Optional[int] = None,
              block_size: Optional[int] = None, density: float = 1.0, shared_blocks: int = 0,
              activation: str = "gelu") -> dict:
    """Forward FLOPs per token (multiply-add = 2) of a gated sparse FFN vs the dense FFN.

    Counts the GEMMs: ``dense = 2 * d_model * d_ff * (m + 1)`` (``m = 2`` for
    swiglu's gate and up projections); the sparse FFN computes ``active = k +
    shared_blocks`` blocks of ``block_size`` units and adds the gate GEMM
    ``2 * d_model * (n_blocks - shared_blocks)``. Activations, the top-k and
    biases are O(d_ff) and left out of both. ``n_blocks`` / ``block_size`` as
    in :class:`GatedSparseFFN`.

    Returns:
        dict with ``dense``, ``sparse`` (gate included), ``gate``, ``ratio``
        (sparse / dense), ``saved`` (1 - ratio), ``k``, ``active_blocks``,
        ``n_blocks``, ``block_size`` and ``active_fraction``.
    """
    n_blocks, block_size, k = _check_config(d_model, d_ff, n_blocks, block_size, density,
                                            shared_blocks, activation)
    m = 2 if activation == "swiglu" else 1
    dense = 2 * d_model * d_ff * (m + 1)
    active = k + shared_blocks
    gate = 2 * d_model * (n_blocks - shared_blocks)
    sparse = 2 * d_model * active * block_size * (m + 1) + gate
    return {"dense": dense, "sparse": sparse, "gate": gate, "ratio": sparse / dense,
            "saved": 1.0 - sparse / dense, "k": k, "active_blocks": active, "n_blocks": n_blocks,
            "block_size": block_size, "active_fraction": active / n_blocks}


def _dense_blocks_activation(a: torch.Tensor, activation: str, block_size: int) -> torch.Tensor:
    """act over whole blocks: ``[T, S * m * block_size] -> [T, S * block_size]``."""
    if activation == "gelu":
        return F.gelu(a)
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if activation == "silu":
        return F.silu(a)
    v = a.view(a.shape[0], -1, 2, block_size)
    return (F.silu(v[:, :, 0]) * v[:, :, 1]).reshape(a.shape[0], -1)


class GatedSparseFFN(nn.Module):
    """A feed-forward block of which each token computes only its gated blocks.

    Args:
        d_model: model width (input and output features).
        d_ff: hidden width, a multiple of the block count.
        n_blocks: number of blocks the hidden units are cut into (block width
            ``d_ff / n_blocks``); default ``DEFAULT_N_BLOCKS`` (16).
        block_size: hidden units per block, the other way to say the same
            (``n_blocks = d_ff / block_size``); given with ``n_blocks``, the
            two must agree.
        density: fraction of the blocks each token routes to, in (0, 1]:
            ``k = clamp(round(density * n_blocks), 1, n_blocks - shared_blocks)``
            (half rounds up).
        shared_blocks: blocks every token computes (the first ones), not gated.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"`` (the tanh approximation,
            Hugging Face's ``gelu_new``), ``"silu"`` or ``"swiglu"``
            (``silu(gate) * up``; per block, the gate rows then the up rows of ``w1``).
        bias: whether the projections have biases ``b1`` and ``b2``; without,
            both are registered as ``None`` (no keys in ``state_dict``).
        balance_rate: step of the balancing-bias update (0 turns it off).
        aux_loss_weight: weight of the optional auxiliary balance loss.
        auto_balance: update the balancing bias after every ``optimizer.step()``
            of an optimizer that holds this module's parameters. Turn it off
            where the optimizer holds different parameters on different ranks
            (``ZeroRedundancyOptimizer``) and call :func:`update_balance` after
            the step instead.
        balance_group: process group over which the step's block counts are
            summed before the update (default: the world group when
            ``torch.distributed`` is initialised). Pass the data-parallel group
            when the world also spans tensor or pipeline parallelism.

    Parameters: ``w1`` ``[d_ff * m, d_model]`` and ``b1`` (m = 2 for swiglu,
    per block the gate rows then the up rows), ``w2`` ``[d_ff, d_model]``
    (hidden-major), ``b2`` ``[d_model]``, ``gate_weight`` ``[n_routed,
    d_model]``. Buffer: ``balance_bias`` float32 ``[n_routed]``; the step's
    block counts so far (int64 ``[n_routed]``, not a buffer, so that DDP does not
    broadcast them) are :meth:`load_counts`. With ``gate_weight = 0`` every
    selected block has weight 1, so at density 1.0 the module is the dense FFN.
    The LibTorch module ``deepseek_ext::nn::GatedSparseFFN`` is the same.
    """

    def __init__(self, d_model: int, d_ff: int, *, n_blocks: Optional[int] = None,
                 block_size: Optional[int] = None, density: float = 0.3, shared_blocks: int = 0,
                 activation: str = "gelu", bias: bool = True, balance_rate: float = 1e-3,
                 aux_loss_weight: float = 0.0, auto_balance: bool = True,
                 balance_group: Optional["dist.ProcessGroup"] = None, device=None, dtype=None):
        super().__init__()
        self.n_blocks, block_size, self.k = _check_config(d_model, d_ff, n_blocks, block_size, density,
                                                          shared_blocks, activation)
        if balance_rate < 0:
            raise ValueError(f"balance_rate must be >= 0, got {balance_rate}")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        self.d_model, self.d_ff, self.block_size = d_model, d_ff, block_size
        self.density, self.shared_blocks, self.activation = density, shared_blocks, activation
        self.balance_rate, self.aux_loss_weight = balance_rate, aux_loss_weight
        self.auto_balance, self.balance_group = auto_balance, balance_group
        self.n_routed = self.n_blocks - shared_blocks
        m = 2 if activation == "swiglu" else 1
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(d_ff * m, d_model, **kw))
        self.w2 = nn.Parameter(torch.empty(d_ff, d_model, **kw))
        if bias:
            self.b1 = nn.Parameter(torch.empty(d_ff * m, **kw))
            self.b2 = nn.Parameter(torch.empty(d_model, **kw))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.gate_weight = nn.Parameter(torch.empty(self.n_routed, d_model, **kw))
        self.register_buffer("balance_bias", torch.zeros(self.n_routed, device=device, dtype=torch.float32))
        self._load_counts = torch.zeros(self.n_routed, device=device, dtype=torch.int64)
        self.reset_parameters()
        self.aux_loss = torch.zeros((), device=device)
        self._load = torch.zeros(self.n_routed, device=device)
        _BALANCED_MODULES.add(self)
        _register_optimizer_hook()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        b_in, b_hid = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        for p, bound in ((self.w1, b_in), (self.b1, b_in), (self.gate_weight, b_in), (self.w2, b_hid),
                         (self.b2, b_hid)):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.balance_bias.zero_()
            self._load_counts = torch.zeros_like(self._load_counts)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round the balancing bias: it stays float32.
        bias = self.balance_bias
        super()._apply(fn, recurse)
        self.balance_bias = bias.to(device=self.balance_bias.device, dtype=torch.float32)
        self._load = self._load.to(self.balance_bias.device)
        self._load_counts = self._load_counts.to(self.balance_bias.device)
        self.aux_loss = self.aux_loss.to(self.balance_bias.device)
        return self

    def block_load(self) -> torch.Tensor:
        """Per routed block, the fraction of the last forward's (token, block)
        pairs it received: a device tensor (reading it is the caller's sync)."""
        return self._load

    def load_counts(self) -> torch.Tensor:
        """Per routed block, the (token, block) pairs it received in training-mode
        forwards since the last balancing update (int64, on the device)."""
        return self._load_counts

    @torch.no_grad()
    def update_balance(self) -> None:
        """Move the balancing bias by the counts of the step and reset them:
        ``bias += balance_rate * sign(mean(count) - count)``, the counts summed
        over ``balance_group`` first. A collective under torch.distributed: call
        it on every rank. Called after each optimizer step unless
        ``auto_balance=False``; see :func:`update_balance`."""
        update_balance([self])

    def route(self, x2: torch.Tensor):
        """``(scores, topk_idx, order, offsets, gate)`` for ``x2`` ``[T, d_model]``."""
        scores = F.linear(x2, self.gate_weight)
        idx, order, offsets = ops.sparse_ffn_route(scores.detach().float(), self.balance_bias, self.k)
        gate = torch.sigmoid(scores).gather(1, idx) * 2.0
        return scores, idx, order, offsets, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model = {self.d_model}], got {tuple(x.shape)}")
        bs, s = self.block_size, self.shared_blocks
        m = 2 if self.activation == "swiglu" else 1
        x2 = x.reshape(-1, self.d_model)
        scores, _, order, offsets, gate = self.route(x2)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if torch.is_autocast_enabled(x2.device.type):
            # As nn.Linear under autocast: compute in the autocast dtype, whatever the
            # input's dtype; the casts are differentiable, so gradients reach the
            # float32 parameters in their own dtype.
            dtype = torch.get_autocast_dtype(x2.device.type)
            x2, w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (x2, w1, b1, w2, b2))
        r1, r2 = s * m * bs, s * bs
        routed = (w1, b1, w2) if s == 0 else (w1[r1:], None if b1 is None else b1[r1:], w2[r2:])
        out = ops.sparse_ffn(x2, *routed, gate.to(x2.dtype), order, offsets, bs, self.activation)
        if s > 0:
            a = F.linear(x2, w1[:r1], None if b1 is None else b1[:r1])
            out = out + _dense_blocks_activation(a, self.activation, bs) @ w2[:r2]
        if b2 is not None:
            out = out + b2

        counts = offsets[1:] - offsets[:-1]
        load = counts.float() / max(x2.shape[0] * self.k, 1)
        self._load = load
        if self.training and self.balance_rate > 0 and not _recomputing():
            if self._load_counts.device != counts.device:  # moved by FSDP2 or .to() of params only
                self._load_counts = torch.zeros_like(counts)
            with torch.no_grad():
                self._load_counts.add_(counts)
        if self.aux_loss_weight > 0:
            aff = torch.sigmoid(scores.float())
            p = (aff / aff.sum(1, keepdim=True)).mean(0)
            self.aux_loss = (load * self.n_routed * p).sum() * self.aux_loss_weight
        else:
            self.aux_loss = x2.new_zeros((), dtype=torch.float32)
        return out.view(x.shape)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "GatedSparseFFN cannot be compiled by torch.jit.script (its routing and balancing "
            "state are Python): use torch.compile or torch.export, or the LibTorch module "
            "deepseek_ext::nn::GatedSparseFFN from C++")

    def __getstate__(self):
        # A process group cannot be pickled or deep-copied; a copy uses the default.
        state = dict(self.__dict__)
        state["balance_group"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _BALANCED_MODULES.add(self)  # a copy balances like the original
        _register_optimizer_hook()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
                f"n_blocks={self.n_blocks}, k={self.k}, shared_blocks={self.shared_blocks}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}")


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: a recomputation under
    activation checkpointing (torch.utils.checkpoint, reentrant or not), whose
    pairs the original forward has already counted. Under torch.compile this is
    not traced; a compiled recomputation counts its pairs again, which scales
    every count of the module alike and leaves ``sign(mean - count)`` unchanged."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _process_group(module: GatedSparseFFN):
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = module.balance_group if module.balance_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def update_balance(modules: Union[nn.Module, Iterable[GatedSparseFFN]]) -> None:
    """Apply the balancing update of every :class:`GatedSparseFFN` in ``modules``
    (a model, searched with ``modules()``, or an iterable of the modules) and
    reset their counts. The counts of modules that share a device and process
    group are summed over the group in one ``all_reduce``; nothing is read by
    the host. Under torch.distributed every rank must call it with the same
    modules in the same order (``model.modules()`` order is).

    Call it after ``optimizer.step()`` when a module has ``auto_balance=False``
    or its parameters are stepped by something other than a ``torch.optim``
    optimizer.
    """
    if isinstance(modules, nn.Module):
        modules = [m for m in modules.modules() if isinstance(m, GatedSparseFFN)]
    batches: dict = {}
    for m in modules:
        if not isinstance(m, GatedSparseFFN):
            raise TypeError(f"modules must hold GatedSparseFFN modules, got {type(m).__name__}")
        if m.balance_rate > 0:
            if m._load_counts.device != m.balance_bias.device:  # no forward since FSDP2 moved the module
                m._load_counts = torch.zeros_like(m._load_counts, device=m.balance_bias.device)
            group = _process_group(m)
            batches.setdefault((m._load_counts.device, id(group)), (group, []))[1].append(m)
    for group, mods in batches.values():
        counts = torch.cat([m._load_counts for m in mods])
        if group is not None:
            dist.all_reduce(counts, group=group)
        for m, c in zip(mods, counts.split([m.n_routed for m in mods])):
            # sign(mean(c) - c) = sign(sum(c) - n * c), exact in int64.
            step = torch.sign(c.sum() - m.n_routed * c).to(torch.float32)
            m.balance_bias.add_(step, alpha=m.balance_rate)
            m._load_counts.zero_()


# Every live GatedSparseFFN; after an optimizer step, those with auto_balance whose
# gate weight the optimizer holds are updated, in the order of the optimizer's
# parameters (the same on every rank, so the collectives match).
_BALANCED_MODULES: "weakref.WeakSet[GatedSparseFFN]" = weakref.WeakSet()
_OPTIMIZER_HOOK = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    modules = [m for m in list(_BALANCED_MODULES) if m.auto_balance and m.balance_rate > 0]
    if not modules:
        return
    position = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            position.setdefault(id(p), len(position))
    held = [(position[id(m.gate_weight)], m) for m in modules if id(m.gate_weight) in position]
    if held:
        update_balance([m for _, m in sorted(held, key=lambda t: t[0])])


def _register_optimizer_hook() -> None:
    global _OPTIMIZER_HOOK
    if _OPTIMIZER_HOOK is None:
        _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
