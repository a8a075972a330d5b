"""``share_attention_``: tie the attention weights of a model's layers by a sharing plan.

Each layer keeps its own attention module, and with it everything its forward
does per layer: rotary embeddings, masks, its KV-cache slot (Hugging Face
attention modules index the cache by their ``layer_idx``), the SDPA/flash
choice. What is shared is what holds parameters: each child module with
parameters (the q/k/v/o projections, a fused ``c_attn``, q/k norms) becomes the
same module object in every layer of a group, and parameters the attention
module holds directly become the same ``nn.Parameter``. A weight therefore
appears once in ``parameters()``, its gradient is the sum over its uses, and
:func:`deepseek_ext.distributed.fully_shard_per_block` shards each shared child
as its own FSDP2 unit.

Attention modules are the outermost modules whose class name contains
``Attention`` (``GPT2Attention``, ``LlamaAttention``, torchtitan's
``Attention``, ``nn.MultiheadAttention``, our ``SharedAttention``) and that hold
parameters; modules of different class or parameter shapes (an encoder-decoder's
self- and cross-attention) are shared within their own kind.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from deepseek_ext.nn.shared_attention import SHARING_PLANS, sharing_plan

__all__ = ["attention_modules", "share_attention_"]


def _signature(module: nn.Module) -> tuple:
    return (type(module),) + tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())


def attention_modules(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
                      ) -> List[Tuple[str, nn.Module]]:
    """``(fqn, module)`` of each attention module of ``model``, in layer order
    (a module used by several layers appears at each use)."""
    found: List[Tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules(remove_duplicate=False):
        if "Attention" not in type(module).__name__ or not any(True for _ in module.parameters()):
            continue
        if any(fqn.startswith(f + ".") for f, _ in found):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        found.append((fqn, module))
    return found


def _param_children(module: nn.Module) -> List[str]:
    return [n for n, c in module.named_children() if any(True for _ in c.parameters())]


def share_attention_(model: nn.Module, plan: str = "all", *, n_unique: Optional[int] = None,
                     init: str = "first", filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> dict:
    """Share the attention weights of ``model``'s layers, in place, by ``plan``.

    Args:
        plan: ``"all"`` (one set for every layer), ``"sequence"`` (runs of
            consecutive layers), ``"cycle"`` (layer i uses set i % n_unique),
            ``"cycle_reverse"`` or ``"none"``; see :func:`deepseek_ext.nn.sharing_plan`.
        n_unique: the number of weight sets (the plan's default when None).
        init: ``"first"``: a set starts as the weights of its first layer;
            ``"mean"``: as the mean over the layers that use it.
        filter_fn: ``filter_fn(module, fqn)`` selects the attention modules
            that take part (torchao's convention).

    Returns ``{"groups": [[leader fqn, follower fqn, ...], ...], "parameters_removed": n}``
    (``n`` counts the parameters that no longer exist on their own). Sharing
    an already shared model again by the same plan changes nothing.
    """
    if plan not in SHARING_PLANS:
        raise ValueError(f"plan must be one of {', '.join(SHARING_PLANS)}, got {plan!r}")
    if init not in ("first", "mean"):
        raise ValueError(f'init must be "first" or "mean", got {init!r}')
    found = attention_modules(model, filter_fn)
    if not found:
        if filter_fn is not None and attention_modules(model):
            raise ValueError(f"filter_fn selected none of the attention modules of {type(model).__name__}")
        raise ValueError(
            f"no attention module found in {type(model).__name__}: share_attention_ looks for modules whose "
            "class name contains 'Attention' and that hold parameters")
    kinds: Dict[tuple, List[Tuple[str, nn.Module]]] = {}
    for fqn, module in found:
        kinds.setdefault(_signature(module), []).append((fqn, module))
    before = sum(p.numel() for p in model.parameters())
    groups: List[List[str]] = []
    for layers in kinds.values():
        if len(layers) < 2:
            continue
        assignment = sharing_plan(plan, len(layers), n_unique)
        members: Dict[int, List[Tuple[str, nn.Module]]] = {}
        for (fqn, module), u in zip(layers, assignment):
            members.setdefault(u, []).append((fqn, module))
        for group in members.values():
            leader_fqn, leader = group[0]
            if init == "mean" and len(group) > 1:
                with torch.no_grad():
                    params = [dict(m.named_parameters()) for _, m in group]
                    for name, p in params[0].items():
                        p.copy_(torch.stack([ps[name].detach() for ps in params]).mean(0).to(p.dtype))
            tied: Dict[str, str] = {}
            for fqn, module in group[1:]:
                if module is leader:
                    continue  # the same module already serves both layers
                for child in _param_children(leader):
                    if getattr(module, child) is not getattr(leader, child):
                        setattr(module, child, getattr(leader, child))
                for name, p in list(leader._parameters.items()):
                    if p is not None and module._parameters.get(name) is not p:
                        module._parameters[name] = p
                # Hugging Face's save_pretrained keeps one copy of tensors that
                # modules declare tied (safetensors refuses aliased tensors).
                tied = {n: f"{leader_fqn}.{n}" for n, _ in leader.named_parameters()}
                module._tied_weights_keys = dict(tied)
            if len(group) > 1:
                groups.append([f for f, _ in group])
    after = sum(p.numel() for p in model.parameters())
    return {"groups": groups, "parameters_removed": before - after, "plan": plan, "n_unique": n_unique,
            "init": init}
