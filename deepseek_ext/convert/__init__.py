"""One-call converters that apply the library's techniques to models people already have.

In torchao's style (``quantize_(model, config, filter_fn)``): each converter
changes the model in place, takes ``filter_fn(module, fqn)`` to choose
modules, and returns what it did::

    from transformers import LlamaConfig, LlamaForCausalLM
    from deepseek_ext import convert

    model = LlamaForCausalLM(LlamaConfig(...))
    convert.sparsify_ffn_(model, density=0.3, n_blocks=16)   # MLPs -> GatedSparseFFN
    convert.share_attention_(model, "cycle", n_unique=2)      # attention weights tied across layers
    convert.use_fused_linear_(model, filter_fn=lambda m, fqn: fqn != "lm_head")

:meth:`deepseek_ext.recipe.Recipe.apply` runs the ones a recipe turns on.

A Hugging Face model records each conversion in its config
(``config.deepseek_ext_conversions``), so ``save_pretrained`` writes it to
``config.json``; :func:`from_pretrained` rebuilds the converted model from such
a checkpoint and refuses a checkpoint whose weights do not fit it.
``from_pretrained`` of ``transformers`` itself knows nothing of the
conversions and would build the dense model: load converted checkpoints with
ours.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from torch import nn

from deepseek_ext.convert._attention import attention_modules
from deepseek_ext.convert._attention import share_attention_ as _share_attention
from deepseek_ext.convert._ffn import SparseMLP, recognise_mlp
from deepseek_ext.convert._ffn import sparsify_ffn_ as _sparsify_ffn
from deepseek_ext.convert._linear import use_fused_linear_ as _use_fused_linear

__all__ = ["SparseMLP", "attention_modules", "conversions", "from_pretrained", "recognise_mlp",
           "share_attention_", "sparsify_ffn_", "use_fused_linear_"]

CONFIG_KEY = "deepseek_ext_conversions"

Filter = Optional[Callable[[nn.Module, str], bool]]


def _json_safe(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _record(model: nn.Module, entry: dict) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    setattr(config, CONFIG_KEY, list(getattr(config, CONFIG_KEY, None) or []) + [entry])


def conversions(model: nn.Module) -> list:
    """The conversions recorded in ``model.config`` (empty for other models)."""
    return list(getattr(getattr(model, "config", None), CONFIG_KEY, None) or [])


def sparsify_ffn_(model: nn.Module, *, density: float = 0.3, n_blocks: int = 16, filter_fn: Filter = None,
                  **ffn_kwargs) -> dict:
    report = _sparsify_ffn(model, density=density, n_blocks=n_blocks, filter_fn=filter_fn, **ffn_kwargs)
    if report["converted"]:
        _record(model, {"op": "sparsify_ffn_", "density": density, "n_blocks": n_blocks,
                        "modules": report["converted"], **{"ffn_kwargs": _json_safe(ffn_kwargs)}})
    return report


sparsify_ffn_.__doc__ = _sparsify_ffn.__doc__


def share_attention_(model: nn.Module, plan: str = "all", *, n_unique: Optional[int] = None, init: str = "first",
                     filter_fn: Filter = None) -> dict:
    report = _share_attention(model, plan, n_unique=n_unique, init=init, filter_fn=filter_fn)
    if report["groups"]:
        modules = [f for f, _ in attention_modules(model, filter_fn)]
        _record(model, {"op": "share_attention_", "plan": plan, "n_unique": n_unique, "init": init,
                        "modules": modules, "groups": report["groups"]})
    return report


share_attention_.__doc__ = _share_attention.__doc__


def use_fused_linear_(model: nn.Module, *, filter_fn: Filter = None) -> dict:
    report = _use_fused_linear(model, filter_fn=filter_fn)
    if report["converted"]:
        _record(model, {"op": "use_fused_linear_", "modules": report["converted"]})
    return report


use_fused_linear_.__doc__ = _use_fused_linear.__doc__


def _only(fqns) -> Callable[[nn.Module, str], bool]:
    keep = set(fqns)
    return lambda _module, fqn: fqn in keep


def replay_(model: nn.Module, entries: list) -> None:
    """Apply recorded conversions (``conversions(model)`` of a converted model) to
    an unconverted model of the same architecture."""
    for e in entries:
        op = e.get("op")
        if op == "sparsify_ffn_":
            sparsify_ffn_(model, density=e["density"], n_blocks=e["n_blocks"], filter_fn=_only(e["modules"]),
                          **e.get("ffn_kwargs", {}))
        elif op == "share_attention_":
            report = share_attention_(model, e["plan"], n_unique=e["n_unique"], init=e["init"],
                                      filter_fn=_only(e["modules"]))
            if report["groups"] != e["groups"]:
                raise ValueError(f"share_attention_ grouped {report['groups']} where the checkpoint recorded "
                                 f"{e['groups']}: the model does not match the checkpoint's architecture")
        elif op == "use_fused_linear_":
            use_fused_linear_(model, filter_fn=_only(e["modules"]))
        else:
            raise ValueError(f"unknown recorded conversion {op!r}: saved by a newer deepseek_ext?")


def _load_checkpoint(path: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {path}: save the model with save_pretrained")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


def from_pretrained(model_cls, path: str, **config_kwargs) -> nn.Module:
    """Load a Hugging Face checkpoint saved by ``save_pretrained`` after our
    conversions: build ``model_cls`` (a ``transformers`` model class or an
    ``AutoModel*`` class) from the saved config, apply the recorded
    conversions, then load the weights. Every parameter must come from the
    checkpoint (a tied one through the tensor it is tied to) and every tensor
    of the checkpoint must be used, or a ValueError names the difference: a
    converted checkpoint never turns silently into the dense model, nor the
    reverse."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    entries = list(getattr(config, CONFIG_KEY, None) or [])
    setattr(config, CONFIG_KEY, [])
    build = getattr(model_cls, "from_config", None) or model_cls._from_config
    model = build(config)
    replay_(model, entries)
    state = _load_checkpoint(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if id(params[k]) not in loaded]
    if unexpected or untied:
        raise ValueError(
            f"the checkpoint at {path} does not fit {type(model).__name__} after its recorded conversions "
            f"({[e['op'] for e in entries] or 'none'}): missing {sorted(untied)[:8]}, unexpected "
            f"{sorted(unexpected)[:8]}")
    return model
