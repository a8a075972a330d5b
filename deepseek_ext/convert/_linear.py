"""``use_fused_linear_``: ``nn.Linear`` -> :class:`deepseek_ext.nn.Linear`."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from deepseek_ext.nn.linear import Linear

__all__ = ["untied_linears", "use_fused_linear_"]


def _uses(model: nn.Module) -> Dict[int, List[str]]:
    uses: Dict[int, List[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            uses.setdefault(id(p), []).append(f"{fqn}.{name}" if fqn else name)
    return uses


def _tied_elsewhere(model: nn.Module, fqn: str, module: nn.Module, uses: Dict[int, List[str]]) -> List[str]:
    """The other modules' names for ``module``'s parameters (a module shared by
    several layers is one module, not a tie)."""
    paths = {f for f, m in model.named_modules(remove_duplicate=False) if m is module}
    return sorted({u for _, p in module.named_parameters(recurse=False) for u in uses[id(p)]
                   if u.rpartition(".")[0] not in paths})


def untied_linears(model: nn.Module) -> List[str]:
    """The ``torch.nn.Linear`` modules of ``model`` whose parameters no other module uses."""
    uses = _uses(model)
    return [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear
            and not _tied_elsewhere(model, fqn, m, uses)]


def use_fused_linear_(model: nn.Module, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> dict:
    """Swap, in place, each ``torch.nn.Linear`` of ``model`` (the class itself,
    not subclasses, which may compute differently) for
    :class:`deepseek_ext.nn.Linear`, whose weight gradient is unscaled and
    checked for inf/NaN inside its GEMM while a
    :class:`~deepseek_ext.amp.DynamicLossScaler` is active. The new module
    holds the same ``nn.Parameter`` objects (an optimizer built before keeps
    working), the same hooks and ``state_dict``.

    A weight tied to another module (GPT-2's LM head and token embedding) is
    refused with a ValueError naming both uses: the other use's gradient would
    arrive scaled and be added to the unscaled one. Exclude such layers with
    ``filter_fn(module, fqn)`` (torchao's convention), e.g.
    ``filter_fn=lambda m, fqn: fqn != "lm_head"``.

    Returns ``{"converted": [fqn, ...], "already_fused": n}``.
    """
    uses = _uses(model)
    targets = []
    seen = set()
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in seen:
            continue
        seen.add(id(module))
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        owners = _tied_elsewhere(model, fqn, module, uses)
        if owners:
            raise ValueError(
                f"{fqn}.weight is tied to {owners}: deepseek_ext.nn.Linear unscales its own weight "
                "gradient, and the other use's share would arrive scaled. Keep this layer a torch.nn.Linear "
                f"with filter_fn (e.g. filter_fn=lambda m, fqn: fqn != {fqn!r})")
        targets.append((fqn, module))
    already = sum(isinstance(m, Linear) for m in model.modules())
    if not targets and not already:
        if filter_fn is not None and any(type(m) is nn.Linear for m in model.modules()):
            raise ValueError(f"filter_fn selected none of the nn.Linear modules of {type(model).__name__}")
        raise ValueError(f"no torch.nn.Linear found in {type(model).__name__}")
    for fqn, module in targets:
        new = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(module, attr):
                setattr(new, attr, getattr(module, attr))
        _replace_everywhere(model, module, new)
    return {"converted": [f for f, _ in targets], "already_fused": already}


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace ``old`` at every place it is registered (a module shared by layers stays shared)."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new
