"""The low-cost training recipe, one switch per technique.

A :class:`Recipe` says which of the library's techniques a training run uses;
each can be turned on alone, so that its contribution can be measured against
the baseline (all off)::

    recipe = Recipe.low_cost()                       # everything on
    model = recipe.build_model(ModelConfig(vocab_size=256, d_model=256, n_layers=4,
                                           n_heads=4, d_ff=1024, max_seq_len=128))
    ddp = DDP(model)
    comm = recipe.register_comm_hook(ddp)            # int8 hook, or counting allreduce
    scaler = recipe.make_scaler("cuda")              # fp16 + DynamicLossScaler on CUDA
    with recipe.autocast("cuda"):
        loss = ...

The techniques:

``mixed_precision``
    float16 autocast with :class:`deepseek_ext.amp.DynamicLossScaler` on CUDA
    (``amp_dtype="bfloat16"``: bfloat16 autocast, no loss scale).
    On a CPU the run stays in float32: CPUs without native half-precision
    matrix units (like the 2-core machine the demo defaults target) run
    bf16/fp16 GEMMs slower than fp32, so the switch changes nothing there and
    :meth:`Recipe.precision_label` says so.
``shared_attention``
    attention parameters shared across layers (:class:`deepseek_ext.nn.SharedAttentionTransformer`
    with ``sharing="all"`` by default).
``sparse_ffn``
    :class:`deepseek_ext.nn.GatedSparseFFN` at ``ffn_density`` (0.3) instead of the dense FFN.
``int8_comm``
    :func:`deepseek_ext.distributed.int8_compress_hook` on the DDP model; the baseline gets
    :func:`deepseek_ext.distributed.counting_allreduce_hook` (plain allreduce, bytes counted
    the same way).
``progressive``
    :class:`deepseek_ext.train.ProgressiveSchedule`: a shallower model on a data fraction
    first, then deepened, then only the top layers tuned.
``data_pipeline``
    memory-mapped token windows (:class:`deepseek_ext.data.MemmapTokenDataset`) with a
    background prefetcher, instead of reading and tokenising text per sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch

__all__ = ["ConversionSummary", "ModelConfig", "Recipe", "TECHNIQUES"]

TECHNIQUES = ("mixed_precision", "shared_attention", "sparse_ffn", "int8_comm", "progressive", "data_pipeline")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder (pre-norm blocks, learned positions, tied LM head)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    dropout: float = 0.0


@dataclass(frozen=True)
class ConversionSummary:
    """What :meth:`Recipe.apply` changed: the modules each converter replaced or
    tied (``share_attention_``: the layers that now use another layer's
    weights), unique parameters and the converted MLPs' forward FLOPs per token
    before and after."""

    converted: dict
    parameters_before: int
    parameters_after: int
    ffn_flops_before: int
    ffn_flops_after: int

    def __str__(self) -> str:
        lines = [f"{op}: {len(mods)} modules" for op, mods in self.converted.items()]
        lines.append(f"parameters: {self.parameters_before:,} -> {self.parameters_after:,} "
                     f"({self.parameters_after / max(self.parameters_before, 1):.3f}x)")
        if self.ffn_flops_before:
            lines.append(f"FFN FLOPs/token: {self.ffn_flops_before:,} -> {self.ffn_flops_after:,} "
                         f"({self.ffn_flops_after / self.ffn_flops_before:.3f}x)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Recipe:
    mixed_precision: bool = False
    shared_attention: bool = False
    sparse_ffn: bool = False
    int8_comm: bool = False
    progressive: bool = False
    data_pipeline: bool = False
    # Knobs of the techniques.
    sharing: str = "all"
    amp_dtype: str = "float16"  # mixed_precision's autocast dtype on CUDA: float16 (+ loss scaler) or bfloat16
    ffn_density: float = 0.3
    ffn_n_blocks: int = 16  # blocks of d_ff (block width d_ff / ffn_n_blocks); see GatedSparseFFN
    comm_block_size: int = 256
    progressive_start_frac: float = 0.5  # start with this fraction of the layers
    progressive_freeze_top: Optional[int] = None  # layers left trainable in phase 3 (default: half)

    def __post_init__(self) -> None:
        if not 0.0 < self.ffn_density <= 1.0:
            raise ValueError(f"ffn_density must be in (0, 1], got {self.ffn_density}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f'amp_dtype must be "float16" or "bfloat16", got {self.amp_dtype!r}')
        if not 0.0 < self.progressive_start_frac <= 1.0:
            raise ValueError(f"progressive_start_frac must be in (0, 1], got {self.progressive_start_frac}")

    # -- named recipes -------------------------------------------------------
    @classmethod
    def baseline(cls, **knobs) -> "Recipe":
        """Every technique off: fp32, dense FFN, unshared attention, plain allreduce, naive data."""
        return cls(**knobs)

    @classmethod
    def low_cost(cls, **knobs) -> "Recipe":
        """Every technique on."""
        return cls(**{**{t: True for t in TECHNIQUES}, **knobs})

    @classmethod
    def only(cls, technique: str, **knobs) -> "Recipe":
        """The baseline with one technique on."""
        if technique not in TECHNIQUES:
            raise ValueError(f"technique must be one of {TECHNIQUES}, got {technique!r}")
        return cls(**{technique: True}, **knobs)

    def enabled(self) -> List[str]:
        return [t for t in TECHNIQUES if getattr(self, t)]

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    # -- precision -----------------------------------------------------------
    def compute_dtype(self, device) -> torch.dtype:
        """``amp_dtype`` on CUDA when mixed precision is on; float32 otherwise (see the module doc)."""
        if self.mixed_precision and torch.device(device).type == "cuda":
            return getattr(torch, self.amp_dtype)
        return torch.float32

    def precision_label(self, device) -> str:
        dt = self.compute_dtype(device)
        if dt == torch.float16:
            return "fp16 autocast + DynamicLossScaler"
        if dt == torch.bfloat16:
            return "bf16 autocast"
        if self.mixed_precision:
            return "fp32 (mixed precision is CUDA-only: no fast half GEMM on this CPU)"
        return "fp32"

    def autocast(self, device):
        dt = self.compute_dtype(device)
        if dt == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=dt)

    def make_scaler(self, device):
        from deepseek_ext.amp import DynamicLossScaler

        dt = self.compute_dtype(device)
        return DynamicLossScaler.for_dtype(dt, device=str(device))

    # -- model ---------------------------------------------------------------
    def start_layers(self, cfg: ModelConfig) -> int:
        if not self.progressive:
            return cfg.n_layers
        # Growth copies blocks and keeps what blocks share shared: with attention
        # shared across layers, start from at least two blocks so there is sharing to keep.
        floor = 2 if self.shared_attention and self.sharing != "none" else 1
        return min(cfg.n_layers, max(floor, round(cfg.n_layers * self.progressive_start_frac)))

    def build_model(self, cfg: ModelConfig, n_layers: Optional[int] = None) -> torch.nn.Module:
        """The model of this recipe (``n_layers`` overrides the config's depth)."""
        from deepseek_ext.nn import SharedAttentionTransformer

        ffn_factory = None
        if self.sparse_ffn:
            from deepseek_ext.nn import GatedSparseFFN

            def ffn_factory(_layer: int) -> torch.nn.Module:
                return GatedSparseFFN(cfg.d_model, cfg.d_ff, n_blocks=self.ffn_n_blocks,
                                      density=self.ffn_density, activation="gelu")
        return SharedAttentionTransformer(
            cfg.vocab_size, cfg.d_model, n_layers or cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq_len,
            sharing=self.sharing if self.shared_attention else "none", dropout=cfg.dropout, causal=True,
            activation="gelu", ffn_factory=ffn_factory)

    def ffn_flops_per_token(self, cfg: ModelConfig) -> int:
        """Forward FFN FLOPs per token of the whole stack (gate included)."""
        from deepseek_ext.nn import ffn_flops

        if self.sparse_ffn:
            f = ffn_flops(cfg.d_model, cfg.d_ff, n_blocks=self.ffn_n_blocks, density=self.ffn_density,
                          activation="gelu")["sparse"]
        else:
            f = ffn_flops(cfg.d_model, cfg.d_ff, activation="gelu")["dense"]
        return int(f) * cfg.n_layers

    @staticmethod
    def aux_loss(model: torch.nn.Module) -> Optional[torch.Tensor]:
        """Sum of the auxiliary losses the model's sparse FFNs produced in the last forward."""
        total = None
        for m in model.modules():
            if type(m).__name__ == "GatedSparseFFN" and getattr(m, "aux_loss_weight", 0.0):
                total = m.aux_loss if total is None else total + m.aux_loss
        return total

    # -- models users bring --------------------------------------------------
    def apply(self, model: torch.nn.Module) -> "ConversionSummary":
        """Apply this recipe's model techniques to a model built elsewhere (a
        Hugging Face or torchtitan model, your own), in place, with the
        converters of :mod:`deepseek_ext.convert`: ``sparse_ffn`` ->
        ``sparsify_ffn_`` (``ffn_density``, ``ffn_n_blocks``),
        ``shared_attention`` -> ``share_attention_`` (``sharing``),
        ``mixed_precision`` -> ``use_fused_linear_`` on every ``nn.Linear``
        whose weight is not tied to another module. The other techniques act on
        the training loop (:meth:`register_comm_hook`, :meth:`make_scaler`,
        :meth:`make_schedule`), not on the model."""
        from deepseek_ext import convert
        from deepseek_ext.convert._linear import untied_linears

        params_before = sum(p.numel() for p in model.parameters())
        converted, flops = {}, {"before": 0, "after": 0}
        if self.sparse_ffn:
            r = convert.sparsify_ffn_(model, density=self.ffn_density, n_blocks=self.ffn_n_blocks)
            converted["sparsify_ffn_"] = r["converted"]
            flops = {"before": r["ffn_flops"]["dense"], "after": r["ffn_flops"]["sparse"]}
        if self.shared_attention:
            r = convert.share_attention_(model, self.sharing)
            converted["share_attention_"] = [g for group in r["groups"] for g in group[1:]]
        if self.mixed_precision:
            keep = set(untied_linears(model))  # HF GPT-2's projections are Conv1D: none to swap
            converted["use_fused_linear_"] = convert.use_fused_linear_(
                model, filter_fn=lambda _m, fqn: fqn in keep)["converted"] if keep else []
        return ConversionSummary(converted, params_before, sum(p.numel() for p in model.parameters()),
                                 flops["before"], flops["after"])

    # -- communication -------------------------------------------------------
    def register_comm_hook(self, ddp_model, process_group=None, state=None, **state_kwargs):
        """Registers the recipe's DDP hook and returns its state (``state.stats()`` counts bytes).
        Pass the ``state`` of an earlier registration to keep it (and its counters) when
        the model is wrapped again, e.g. after progressive growth."""
        from deepseek_ext import distributed as ddist

        if state is not None:
            hook = ddist.int8_compress_hook if self.int8_comm else ddist.counting_allreduce_hook
            ddp_model.register_comm_hook(state, hook)
            return state
        if self.int8_comm:
            state = ddist.Int8CompressionState(process_group, block_size=self.comm_block_size, **state_kwargs)
            ddp_model.register_comm_hook(state, ddist.int8_compress_hook)
        else:
            state = ddist.CountingAllreduceState(process_group)
            ddp_model.register_comm_hook(state, ddist.counting_allreduce_hook)
        return state

    # -- progressive schedule ------------------------------------------------
    def make_schedule(self, total_steps: int, cfg: ModelConfig):
        """The progressive schedule of this recipe, or ``None`` when it is off."""
        if not self.progressive:
            return None
        if self.start_layers(cfg) >= cfg.n_layers:
            raise ValueError(f"progressive training starts from {self.start_layers(cfg)} of n_layers = "
                             f"{cfg.n_layers} layers and has none to grow: give the model more layers "
                             "(progressive_start_frac, and at least 2 start layers with shared attention)")
        from deepseek_ext.train import ProgressiveSchedule

        top = self.progressive_freeze_top or max(1, cfg.n_layers // 2)
        # Phase 3 tunes the top blocks and the final LayerNorm (the tied embedding/head is frozen).
        return ProgressiveSchedule(total_steps, grow_to_layers=cfg.n_layers, freeze_top_n=top,
                                   keep_trainable=("ln_f",))
