"""Checkpoint layouts, one module per layout, each an explicit per-layer attention weight map.

Add a family: write a module with ``NAME``, ``MODEL_TYPES`` and ``attention_map(config, layer,
shape)`` (see :mod:`gqa.convert.layouts.base`) and list it in ``_MODULES``.
"""

from __future__ import annotations

from types import ModuleType

from gqa.convert.layouts import llama, olmo2, phi3, qwen3, stablelm
from gqa.convert.layouts.base import AttentionShape, Layout, Role

__all__ = ["SUPPORTED_MODEL_TYPES", "layout_for", "attention_shape", "AttentionShape", "Layout", "Role"]

_MODULES: tuple[ModuleType, ...] = (llama, qwen3, olmo2, stablelm, phi3)
_BY_MODEL_TYPE = {mt: mod for mod in _MODULES for mt in mod.MODEL_TYPES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def layout_for(model_type: str | None) -> ModuleType:
    """The layout module for a transformers ``model_type``; a one-line ValueError lists the supported ones."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"architecture {model_type!r} is not supported by gqa convert; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _BY_MODEL_TYPE[model_type]


def attention_shape(config: dict) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim from a transformers config dict."""
    try:
        n_heads = int(config["num_attention_heads"])
        n_layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json lacks a valid {e} field; is it a transformers causal-LM config?") from None
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise ValueError(f"config.json has {n_heads} query heads, not a multiple of its {n_kv} KV heads")
    return AttentionShape(n_layers, n_heads, n_kv, head_dim)
