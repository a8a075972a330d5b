"""``sparsify_ffn_``: dense MLPs -> :class:`GatedSparseFFN` initialised from their weights.

A module is taken for a dense MLP when its structure proposes one and a probe
forward confirms it:

* structure: no parameters of its own, and two or three projections
  (``nn.Linear``, or Hugging Face's ``Conv1D`` whose weight is stored
  transposed) that fit ``d_model -> d_ff -> d_model`` (two) or
  ``d_model -> d_ff`` twice plus ``d_ff -> d_model`` (three: a gated MLP);
  the other children hold no parameters (activations, dropout);
* probe: on a random input, in eval mode, the module's own forward equals
  ``out(act(in(x)))`` (or ``out(silu(gate(x)) * up(x))``) for one supported
  activation (``gelu``, ``gelu_tanh``, ``silu``; gated: ``silu``), found by
  evaluating the activation child, or by trying each when the forward calls a
  function (torchtitan's ``FeedForward`` calls ``F.silu``).

The probe makes the match exact rather than guessed from names: HF GPT-2's
``GPT2MLP`` (``gelu_new`` is the tanh GELU), Llama-style ``*MLP`` modules
(``gate_proj``/``up_proj``/``down_proj``), torchtitan's ``FeedForward``
(``w1``/``w3``/``w2``), ``nn.Sequential(Linear, act, Linear)`` and our own
``DenseFFN`` all pass through the same test. A dropout after the output
projection is kept; a dropout on the hidden layer cannot be (the fused op has
none) and is refused when its probability is not 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_ext.nn.sparse_ffn import GatedSparseFFN, ffn_flops

__all__ = ["SparseMLP", "sparsify_ffn_", "recognise_mlp"]

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
# Non-parametric activations we can name but not fuse, for the error message.
_KNOWN_UNSUPPORTED: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu2": lambda t: F.relu(t).square(),
    "gelu_quick": lambda t: t * torch.sigmoid(1.702 * t),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda t: t,
}


class SparseMLP(nn.Module):
    """What :func:`sparsify_ffn_` puts in place of a dense MLP: the
    :class:`GatedSparseFFN` ``ffn`` and the dropout the MLP applied to its
    output (``nn.Identity`` when it had none). ``source`` names the class it
    replaced."""

    def __init__(self, ffn: GatedSparseFFN, dropout: Optional[nn.Module] = None, source: str = ""):
        super().__init__()
        self.ffn = ffn
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ffn(x))

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


@dataclass
class _Proj:
    name: str
    module: nn.Module

    def weight(self) -> torch.Tensor:
        """``[out, in]``, as ``nn.Linear`` stores it."""
        w = self.module.weight
        return w if isinstance(self.module, nn.Linear) else w.t()

    def bias(self) -> Optional[torch.Tensor]:
        return self.module.bias


@dataclass
class MLPMatch:
    """A recognised dense MLP: ``out(act(in(x)))`` or ``out(silu(gate(x)) * up(x))``."""

    d_model: int
    d_ff: int
    activation: str  # gelu | gelu_tanh | silu | swiglu
    w_in: _Proj  # the activated projection (gate for swiglu)
    w_out: _Proj
    w_up: Optional[_Proj] = None  # swiglu's linear branch
    dropout: Optional[nn.Module] = None  # applied to the output

    @property
    def has_bias(self) -> bool:
        return any(p is not None and p.bias() is not None for p in (self.w_in, self.w_up, self.w_out))

    def describe(self) -> dict:
        d = {"activation": self.activation, "in": self.w_in.name, "out": self.w_out.name}
        if self.w_up is not None:
            d["up"] = self.w_up.name
        return d


def _projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers.pytorch_utils.Conv1D: y = x @ weight + bias, weight [in, out].
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and hasattr(module, "nf"))


def _activation_name(fn: nn.Module) -> Optional[str]:
    """The name of a parameter-free activation module, found by evaluating it;
    ``"?"`` when it is none we know, None when it is not an activation at all."""
    z = torch.linspace(-6.0, 6.0, 241, dtype=torch.float32)
    try:
        with torch.no_grad():
            y = fn(z)
    except Exception:  # noqa: BLE001 - not a unary tensor function
        return None
    if not isinstance(y, torch.Tensor) or y.shape != z.shape:
        return None
    for table in (_ACTIVATIONS, _KNOWN_UNSUPPORTED):
        for name, ref in table.items():
            if torch.allclose(y.float(), ref(z), rtol=1e-5, atol=1e-6):
                return name
    return "?"


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool):
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


def _tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    return (1e-4, 1e-5) if dtype in (torch.float32, torch.float64) else (3e-2, 3e-2)


def _reference(x: torch.Tensor, act: str, w_in: _Proj, w_out: _Proj, w_up: Optional[_Proj]) -> torch.Tensor:
    a = F.linear(x, w_in.weight(), w_in.bias())
    h = F.silu(a) * F.linear(x, w_up.weight(), w_up.bias()) if w_up is not None else _ACTIVATIONS[act](a)
    return F.linear(h, w_out.weight(), w_out.bias())


def recognise_mlp(module: nn.Module) -> Tuple[Optional[MLPMatch], str]:
    """``(match, "")`` when ``module`` is a dense MLP that :func:`sparsify_ffn_`
    can convert; ``(None, reason)`` otherwise (an empty reason: not an MLP at
    all; a non-empty one: an MLP we cannot fuse, and why)."""
    if any(True for _ in module.parameters(recurse=False)):
        return None, ""
    projs: List[_Proj] = []
    others: List[nn.Module] = []
    for name, child in module.named_children():
        if _projection(child):
            projs.append(_Proj(name, child))
        elif any(True for _ in child.parameters()):
            return None, ""
        else:
            others.append(child)
    # (in, out, up) proposals that fit the shapes; the probe picks the true one.
    candidates: List[Tuple[_Proj, _Proj, Optional[_Proj]]] = []
    if len(projs) == 2:
        (o0, i0), (o1, i1) = (tuple(p.weight().shape) for p in projs)
        if o0 == i1 and i0 == o1:
            candidates = [(projs[0], projs[1], None), (projs[1], projs[0], None)]
    elif len(projs) == 3:
        for j, p_out in enumerate(projs):
            a, b = (p for i, p in enumerate(projs) if i != j)
            if tuple(a.weight().shape) == tuple(b.weight().shape) == tuple(p_out.weight().t().shape):
                candidates += [(a, p_out, b), (b, p_out, a)]
    if not candidates:
        return None, ""
    dropouts = [m for m in others if isinstance(m, nn.modules.dropout._DropoutNd)]
    names = {n for n in (_activation_name(m) for m in others if m not in dropouts) if n is not None}
    gated = candidates[0][2] is not None
    acts = ["swiglu"] if gated else (sorted(names & set(_ACTIVATIONS)) or list(_ACTIVATIONS))
    w = projs[0].module.weight
    if w.device.type == "meta":
        return None, "its weights are on the meta device: convert before to_empty()/fully_shard, with real weights"
    rtol, atol = _tolerance(w.dtype)
    outputs: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    match = None
    with torch.no_grad(), _mode(module, False):
        for p_in, p_out, p_up in candidates:
            d_model = p_in.weight().shape[1]
            if d_model not in outputs:
                gen = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(8, 16, d_model, generator=gen).to(device=w.device, dtype=w.dtype)
                try:
                    y = module(x)
                except Exception:  # noqa: BLE001 - its forward is not f(x) at this width
                    y = None
                outputs[d_model] = (x, y if isinstance(y, torch.Tensor) and y.shape == x.shape else None)
            x, y = outputs[d_model]
            if y is None:
                continue
            for act in acts:
                ref = _reference(x, act, p_in, p_out, p_up)
                if torch.allclose(y, ref, rtol=rtol, atol=atol * float(ref.abs().max().clamp_min(1e-6))):
                    match = MLPMatch(d_model, p_in.weight().shape[0], act, p_in, p_out, p_up)
                    break
            if match is not None:
                break
    if match is None:
        unknown = sorted(names - ({"silu"} if gated else set(_ACTIVATIONS)))
        if unknown and any(y is not None for _, y in outputs.values()):
            kind = "gated MLP" if gated else "MLP"
            return None, (f"{kind} with activation {', '.join(unknown)}: GatedSparseFFN has gelu, gelu_tanh "
                          "and silu, and silu-gated (swiglu) for gated MLPs")
        return None, ""
    live = [m for m in dropouts if m.p > 0]
    if live:
        # A dropout on the output zeroes whole output elements; one on the hidden
        # layer (which the fused op cannot apply) leaves none exactly zero.
        x = outputs[match.d_model][0]
        with torch.no_grad(), _mode(module, True), torch.random.fork_rng(
                devices=[w.device] if w.device.type == "cuda" else []):
            zeros = int((module(x) == 0).sum())
        if zeros == 0:
            return None, (f"it applies dropout (p={live[0].p}) to its hidden layer, which GatedSparseFFN "
                          "cannot: set that dropout to 0 or exclude the module with filter_fn")
    if dropouts:
        match.dropout = dropouts[0]
    return match, ""


def _build(match: MLPMatch, *, n_blocks: int, density: float, ffn_kwargs: dict) -> GatedSparseFFN:
    w = match.w_in.module.weight
    bias = match.has_bias
    ffn = GatedSparseFFN(match.d_model, match.d_ff, n_blocks=n_blocks, density=density,
                         activation=match.activation, bias=bias, device=w.device, dtype=w.dtype, **ffn_kwargs)
    bs = match.d_ff // n_blocks
    with torch.no_grad():
        w_in = match.w_in.weight()
        if match.w_up is not None:
            # Per block: block_size gate rows, then block_size up rows.
            w_up = match.w_up.weight()
            w1 = torch.cat([w_in.reshape(n_blocks, bs, -1), w_up.reshape(n_blocks, bs, -1)], 1)
            ffn.w1.copy_(w1.reshape(-1, match.d_model))
        else:
            ffn.w1.copy_(w_in)
        ffn.w2.copy_(match.w_out.weight().t())  # hidden-major [d_ff, d_model]
        if bias:
            def vec(p: Optional[_Proj], n: int) -> torch.Tensor:
                b = p.bias() if p is not None else None
                return b if b is not None else torch.zeros(n, device=w.device, dtype=w.dtype)

            b_in = vec(match.w_in, match.d_ff)
            if match.w_up is not None:
                b_up = vec(match.w_up, match.d_ff)
                b_in = torch.cat([b_in.reshape(n_blocks, bs), b_up.reshape(n_blocks, bs)], 1).reshape(-1)
            ffn.b1.copy_(b_in)
            ffn.b2.copy_(vec(match.w_out, match.d_model))
        # gate = 2 * sigmoid(scores): zero gate weights give every block weight 1,
        # so at density 1.0 the module computes the dense MLP's function.
        ffn.gate_weight.zero_()
    return ffn


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, name, new)


def sparsify_ffn_(model: nn.Module, *, density: float = 0.3, n_blocks: int = 16,
                  filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, **ffn_kwargs) -> dict:
    """Replace, in place, each dense MLP of ``model`` with a :class:`SparseMLP`
    holding a :class:`GatedSparseFFN` initialised from the MLP's weights.

    ``d_ff`` is cut into ``n_blocks`` blocks of consecutive hidden units, of
    which each token computes ``round(density * n_blocks)``; the gate starts at
    zero weights (every block weighs 1), so at ``density=1.0`` the converted
    model computes the dense model's function. ``filter_fn(module, fqn)``
    (torchao's convention) selects among the recognised MLPs; ``ffn_kwargs``
    go to :class:`GatedSparseFFN` (``balance_rate``, ``shared_blocks``, ...).

    Returns ``{"converted": [fqn, ...], "skipped": {fqn: reason}, "ffn_flops":
    {"dense": ..., "sparse": ...}}`` (forward FLOPs per token summed over the
    converted MLPs). Raises ValueError when nothing is converted: no MLP found
    (naming what it looked for), a filter that selects none, or every match
    refused; a model already converted is left as it is (``converted`` empty,
    ``already_sparse`` counting its modules).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    matches: List[Tuple[str, nn.Module, MLPMatch]] = []
    skipped: Dict[str, str] = {}
    filtered_out = 0
    done: set = set()
    for fqn, module in model.named_modules():
        if any(fqn == d or fqn.startswith(d + ".") for d in done) or isinstance(module, (GatedSparseFFN, SparseMLP)):
            continue
        match, reason = recognise_mlp(module)
        if match is None:
            if reason:
                skipped[fqn or "<model>"] = reason
            continue
        done.add(fqn)
        if filter_fn is not None and not filter_fn(module, fqn):
            filtered_out += 1
            continue
        if match.d_ff % n_blocks:
            raise ValueError(f"n_blocks = {n_blocks} does not divide d_ff = {match.d_ff} of {fqn or '<model>'} "
                             f"({type(module).__name__}); choose a divisor of {match.d_ff}")
        matches.append((fqn, module, match))
    already = sum(isinstance(m, GatedSparseFFN) for m in model.modules())
    if not matches:
        if already and not skipped and not filtered_out:
            return {"converted": [], "skipped": {}, "already_sparse": already,
                    "ffn_flops": {"dense": 0, "sparse": 0}}
        if filtered_out:
            raise ValueError(f"filter_fn selected none of the {filtered_out} dense MLPs found in "
                             f"{type(model).__name__}")
        if skipped:
            detail = "; ".join(f"{k}: {v}" for k, v in skipped.items())
            raise ValueError(f"no MLP of {type(model).__name__} can be converted: {detail}")
        raise ValueError(
            f"no dense MLP found in {type(model).__name__}: sparsify_ffn_ looks for modules with two "
            "projections (nn.Linear or HF Conv1D, d_model -> d_ff -> d_model) around a gelu/gelu_tanh/silu "
            "activation, or three (gate, up, down) with silu, whose forward is exactly that")
    dense = sparse = 0
    for fqn, module, match in matches:
        ffn = _build(match, n_blocks=n_blocks, density=density, ffn_kwargs=ffn_kwargs)
        if not fqn:
            raise ValueError("the model itself is a dense MLP: wrap it in a parent module, or build "
                             "GatedSparseFFN directly")
        _set_submodule(model, fqn, SparseMLP(ffn, match.dropout, type(module).__name__))
        f = ffn_flops(match.d_model, match.d_ff, n_blocks=n_blocks, density=density,
                      shared_blocks=ffn.shared_blocks, activation=match.activation)
        dense += f["dense"]
        sparse += f["sparse"]
    return {"converted": [fqn for fqn, _, _ in matches], "skipped": skipped, "already_sparse": already,
            "ffn_flops": {"dense": dense, "sparse": sparse},
            "spec": {"density": density, "n_blocks": n_blocks, **ffn_kwargs}}
