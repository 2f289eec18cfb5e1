""":class:`CheckpointSpec`: what every reader returns from a config, and the shapes derived from it.

Readers: :func:`gqa.formats.transformers.spec_from_config` (a transformers ``config.json`` dict, with
``per_layer_config``, DeciLM ``block_configs`` or a nested ``text_config``; also gqa's own
:class:`~gqa.model.config.GQAConfig` JSON) and :func:`gqa.formats.gguf.spec_from_gguf` (a checked GGUF
header). Every size is checked once, when the spec is made, against the one limits table
(:data:`gqa.model.config.LIMITS`, through :func:`gqa.model.config.check_int`); from the spec derive

- :meth:`CheckpointSpec.model_config` -> :class:`~gqa.model.config.GQAConfig` (families gqa runs),
- :meth:`CheckpointSpec.attention_shape` -> :class:`AttentionShape` (conversion, any convertible family),
- :meth:`CheckpointSpec.kv_shape` -> :class:`gqa.memory.KVShape` (``gqa memory``, any config with heads).

Head mapping: query head h uses KV head h // (Hq // Hkv) of its layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gqa.errors import GQAUserError
from gqa.model.config import check_int

__all__ = [
    "CheckpointSpec",
    "AttentionShape",
    "positive_float",
    "required",
    "flag",
    "token_id",
    "per_layer_kv_heads",
]


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of one checkpoint, read from its config: what conversion plans against."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class CheckpointSpec:
    """A checked config: the shape of every layer's attention, and how to build the model config.

    family: ``model_type`` (transformers), the GGUF architecture's family, or ``"gqa"``.
    kv_heads: per layer; 0 is a layer without attention (a DeciLM no-op block), which only the KV shape
    accepts. n_heads: query heads (the largest, where a GGUF varies them per layer).
    """

    source: str  # what it was read from, for messages ("config.json", "model.gguf")
    family: str | None
    n_layers: int
    n_heads: int
    kv_heads: tuple[int, ...]
    head_dim: int
    max_context: int | None = None
    raw: object = field(default=None, repr=False, compare=False)  # the dict or GGUF header it came from
    build: Callable[[CheckpointSpec], object] | None = field(default=None, repr=False, compare=False)

    def model_config(self):
        """The :class:`~gqa.model.config.GQAConfig` of a family gqa runs, else a one-line error naming them."""
        if self.build is None:
            from gqa import families

            raise GQAUserError(
                f"model_type {self.family!r} is not supported by gqa.model; supported: "
                f"{', '.join(families.names(runs=True))}"
            )
        return self.build(self)

    def attention_shape(self) -> AttentionShape:
        """The conversion shape: one KV-head count for every layer (the config's ``num_key_value_heads``)."""
        heads = set(self.kv_heads)
        if len(heads) != 1 or 0 in heads:
            raise GQAUserError(
                f"{self.source} has per-layer KV heads {list(self.kv_heads)[:8]}; gqa convert reads checkpoints "
                "with one KV-head count for every layer"
            )
        return AttentionShape(self.n_layers, self.n_heads, heads.pop(), self.head_dim)

    def kv_shape(self, name: str):
        """The :class:`gqa.memory.KVShape` that sizes this model's KV cache."""
        from gqa.memory import KVShape

        return KVShape(name, self.n_heads, self.kv_heads, self.head_dim, self.max_context, self._windows(), self._latent())

    def _latent(self) -> tuple[int, ...] | None:
        """Per layer the cache values of a latent model (gqa's own config with ``latent_rank``, or an MLA
        ``config.json``: DeepSeek-V2/V3's ``kv_lora_rank + qk_rope_head_dim``), else None."""
        if isinstance(self.raw, dict) and self.raw.get("kv_lora_rank") is not None:
            from gqa.model.config import LIMITS, check_int

            big = LIMITS["d_model"]
            rank = check_int("kv_lora_rank", self.raw["kv_lora_rank"], limit=big, field="kv_lora_rank")
            rope = check_int("qk_rope_head_dim", self.raw.get("qk_rope_head_dim", 0), limit=big, minimum=0, field="qk_rope_head_dim")
            return (rank + rope,) * self.n_layers
        if self.family != "gqa" or self.build is None:
            return None
        config = self.model_config()
        return tuple(config.kv_values_per_token()) if config.latent_rank is not None else None

    def _windows(self) -> tuple[int | None, ...] | None:
        """Per layer the sliding window (None: global), from the model config of a family gqa runs
        (Gemma-3, Mistral); None when no layer slides or gqa cannot build the config (a DeciLM no-op
        block): ``gqa memory`` then counts every layer as global, an upper bound."""
        if self.build is None:
            return None
        try:
            config = self.model_config()
        except GQAUserError:
            return None
        windows = tuple(config.layer_window(i) for i in range(config.n_layers))
        return windows if any(windows) else None


# ------------------------------------------------------------------------------------------------
# field readers shared by the config readers: one message per field


def required(cfg: dict, key: str):
    """``cfg[key]``, or a one-line error saying config.json lacks it (a ``null`` value is the value's
    checker's to refuse: it names the type it wants)."""
    if key not in cfg:
        raise GQAUserError(
            f"config.json has no {key!r}; a {cfg.get('model_type')} config needs it (restore config.json)"
        )
    return cfg[key]


def positive_float(value, name: str) -> float:
    """``value`` as a float if it is a positive, finite number, else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GQAUserError(f"{name} must be a positive number, got {value!r}; fix config.json")
    return float(value)


def flag(cfg: dict, key: str, default: bool = False) -> bool:
    val = cfg.get(key, default)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise GQAUserError(f"{key} must be true or false, got {val!r}; fix config.json")
    return val


def token_id(cfg: dict, key: str):
    val = cfg.get(key)
    ok = val is None or (isinstance(val, int) and not isinstance(val, bool) and val >= 0)
    if isinstance(val, list):
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in val)
    if not ok:
        raise GQAUserError(f"{key} must be a token id (or a list of them), got {val!r}; fix config.json")
    return val


def per_layer_kv_heads(cfg: dict, n_layers: int, default: int, *, field: str = "per_layer_config") -> list[int]:
    """KV heads per layer from transformers' ``per_layer_config`` (an object keyed by layer index, or a list
    with one object per layer); a layer without an entry uses ``default``."""
    per_layer = cfg.get(field)
    if isinstance(per_layer, list):
        if len(per_layer) != n_layers:
            raise GQAUserError(
                f"{field} lists {len(per_layer)} layers but num_hidden_layers is {n_layers}; give one entry per layer"
            )
        entries = dict(enumerate(per_layer))
    elif isinstance(per_layer, dict):
        entries = {}
        for k, v in per_layer.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < n_layers):
                raise GQAUserError(f"{field} has key {k!r}; keys are layer indices 0..{n_layers - 1} (fix config.json)")
            entries[int(k)] = v
    else:
        raise GQAUserError(f"{field} must be an object keyed by layer index, got {per_layer!r}; fix config.json")
    heads = []
    for i in range(n_layers):
        entry = entries.get(i, {})
        if not isinstance(entry, dict):
            raise GQAUserError(f'{field}[{i}] must be an object like {{"num_key_value_heads": 2}}, got {entry!r}')
        heads.append(
            check_int(
                "n_kv_heads", entry.get("num_key_value_heads", default), field=f"{field}[{i}].num_key_value_heads"
            )
        )
    return heads
