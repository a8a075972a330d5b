"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models whose blocks share
modules, as cross-layer attention sharing does.

The standard recipe shards every transformer block as its own unit, then the
root (https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html,
torchtitan's ``apply_fsdp``). A module used by two blocks breaks it: the first
block's ``fully_shard`` turns the shared parameters into DTensors, and the
second block's tries to shard those DTensors again (torch raises a ``TypeError``
"value was None" or "Cannot concatenate overlapping meshes"). A shared module
must be a unit of its own, sharded before any block that uses it: each block
then leaves its parameters alone, and the unit gathers them on every use and
reduce-scatters the gradient of each use, which FSDP2 accumulates into one
sharded gradient.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from torch import nn

__all__ = ["fully_shard_per_block", "modules_shared_by_blocks"]


def modules_shared_by_blocks(blocks: Iterable[nn.Module]) -> List[nn.Module]:
    """The outermost submodules that appear in two or more of ``blocks`` (by
    identity), in order of first use. Raises ValueError for a parameter that two
    blocks share through different modules (tied parameters): no per-block unit
    can own it."""
    blocks = list(blocks)
    users: Dict[int, set] = {}
    modules: Dict[int, nn.Module] = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            if m is not block:
                users.setdefault(id(m), set()).add(i)
                modules.setdefault(id(m), m)
    shared = [modules[k] for k, u in users.items() if len(u) > 1]
    inside = {id(sub) for m in shared for sub in m.modules() if sub is not m}
    outer = [m for m in shared if id(m) not in inside]
    covered = {id(p) for m in outer for p in m.parameters()}
    owners: Dict[int, set] = {}
    names: Dict[int, str] = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if id(p) not in covered:
                owners.setdefault(id(p), set()).add(i)
                names.setdefault(id(p), f"blocks[{i}].{name}")
    for k, u in owners.items():
        if len(u) > 1:
            raise ValueError(
                f"parameter {names[k]} is tied across blocks {sorted(u)} through different modules: "
                "per-block FSDP2 cannot shard it. Share the module itself (the same module object in "
                "every block) or shard only the root with fully_shard(model)")
    return outer


def fully_shard_per_block(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None,
                          **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` each module shared by several blocks, then each block, then
    the root; returns ``model`` (now an ``FSDPModule``).

    Args:
        model: the root module.
        blocks: the units to shard one by one; default ``model.layers`` (an
            ``nn.ModuleList``, as :class:`~deepseek_ext.nn.SharedAttentionTransformer`
            and torchtitan's models have).
        fully_shard_kwargs: passed to every ``fully_shard`` call (``mesh``,
            ``reshard_after_forward``, ``mp_policy``, ...).

    A model without shared modules is sharded exactly as the usual recipe does.
    """
    from torch.distributed.fsdp import fully_shard

    if blocks is None:
        blocks = getattr(model, "layers", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError("blocks must be given: model has no nn.ModuleList attribute 'layers' "
                             f"({type(model).__name__})")
    unique: Dict[int, nn.Module] = {}
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise ValueError(f"blocks[{i}] must be an nn.Module, got {type(block).__name__}")
        unique.setdefault(id(block), block)
    blocks = list(unique.values())
    for shared in modules_shared_by_blocks(blocks):
        fully_shard(shared, **fully_shard_kwargs)
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
