"""Checkpoint layouts, one module per layout, each an explicit per-layer attention weight map.

Add a family: write a module with ``NAME``, ``MODEL_TYPES`` and ``attention_map(config, layer,
shape)`` (see :mod:`gqa.convert.layouts.base`) and list it in ``_MODULES``.
"""

from __future__ import annotations

from types import ModuleType

from gqa.convert.layouts import llama, olmo2, phi3, qwen3, stablelm
from gqa.convert.layouts.base import AttentionShape, Layout, Role
from gqa.errors import GQAUserError

__all__ = ["SUPPORTED_MODEL_TYPES", "layout_for", "attention_shape", "AttentionShape", "Layout", "Role"]

_MODULES: tuple[ModuleType, ...] = (llama, qwen3, olmo2, stablelm, phi3)
_BY_MODEL_TYPE = {mt: mod for mod in _MODULES for mt in mod.MODEL_TYPES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


# Bounds on config integers: far above any real model, low enough that nothing loops or allocates for ever.
_LIMITS = {"num_hidden_layers": 10_000, "num_attention_heads": 65_536, "num_key_value_heads": 65_536,
           "hidden_size": 1_048_576, "head_dim": 65_536}  # fmt: skip


def layout_for(model_type) -> ModuleType:
    """The layout module for a transformers ``model_type``; a one-line error lists the supported ones."""
    if not isinstance(model_type, str) or model_type not in _BY_MODEL_TYPE:
        raise GQAUserError(
            f"architecture {model_type!r} is not supported by gqa convert; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _BY_MODEL_TYPE[model_type]


def _config_int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if value is None and default is None and key not in config:
        raise GQAUserError(f"config.json lacks {key}; is it a transformers causal-LM config?")
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 1 <= value <= _LIMITS[key]:
        raise GQAUserError(f"config.json has {key}={value!r}; it must be a whole number from 1 to {_LIMITS[key]:,}")
    return value


def attention_shape(config: dict) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim from a transformers config dict, each checked
    (positive, bounded, KV heads dividing query heads) before anything is allocated."""
    n_heads = _config_int(config, "num_attention_heads")
    n_layers = _config_int(config, "num_hidden_layers")
    hidden = _config_int(config, "hidden_size")
    n_kv = (
        _config_int(config, "num_key_value_heads", n_heads)
        if config.get("num_key_value_heads") is not None
        else n_heads
    )
    if config.get("head_dim") is not None:
        head_dim = _config_int(config, "head_dim")
    else:
        if hidden % n_heads:
            raise GQAUserError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}")
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise GQAUserError(
            f"config.json has {n_heads} query heads, not a multiple of its {n_kv} KV heads; fix config.json"
        )
    return AttentionShape(n_layers, n_heads, n_kv, head_dim)
