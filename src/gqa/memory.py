"""KV-cache arithmetic from a config alone (no weights are read): what GQA buys in memory.

KV bytes per token of one sequence = sum over layers of 2 (K and V) x Hkv x head_dim x bytes per
element. Llama-2-7B (32 layers, 32 KV heads of 128, bf16) takes 512 KiB per token; Llama-3-8B
(8 KV heads) 128 KiB; Llama-2-70B (80 layers, 8 KV heads) 320 KiB. A cache of B sequences of N
tokens takes B x N times that, so with a fixed budget the largest batch grows by the group size g.

Reads transformers ``config.json`` files (nested ``text_config`` too), model folders, gqa
``GQAConfig`` files, per-layer KV heads (``per_layer_config``, DeciLM / Nemotron-NAS
``block_configs``) and GGUF metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa.errors import GQAUserError
from gqa.formats.dtypes import kv_names
from gqa.model.config import LIMITS, check_int
from gqa.model.files import read_json_object
from gqa.units import element_size

__all__ = [
    "KVShape",
    "DTYPE_BYTES",
    "load_kv_shape",
    "kv_shape_from_dict",
    "kv_bytes_per_token",
    "kv_bytes_per_sequence",
    "memory_report",
]

GiB = 2**30
KiB = 2**10

#: Element types a KV cache is kept in: the KV rows of the one dtype table (:mod:`gqa.formats.dtypes`).
KV_DTYPES = kv_names()
#: Bytes per cached element, by name (kept for callers of the old name).
DTYPE_BYTES = {name: element_size(dt) for name, dt in KV_DTYPES.items()}


@dataclass(frozen=True)
class KVShape:
    """What sizes a KV cache: query heads, KV heads per layer (0 = no attention cache), head_dim and, per
    layer, the sliding window a layer attends within (None: every token; ``windows`` None: no layer slides).

    A sliding layer's cache is a ring buffer of its window, so past the window only global layers grow.
    ``latent_values``: per layer the cache values one token takes in a low-rank latent layer (R + Hkv x
    rope dims, :mod:`gqa.latent`), None for 2 x Hkv x head_dim (GQA).
    """

    name: str
    n_heads: int
    kv_heads_per_layer: tuple[int, ...]
    head_dim: int
    max_context: int | None = None
    windows: tuple[int | None, ...] | None = None
    latent_values: tuple[int, ...] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.kv_heads_per_layer)

    def with_kv_heads(self, hkv: int, name: str) -> KVShape:
        """The same model with ``hkv`` KV heads in every layer that has attention."""
        heads = tuple(hkv if h else 0 for h in self.kv_heads_per_layer)
        return KVShape(name, self.n_heads, heads, self.head_dim, self.max_context, self.windows)

    def layer_values(self) -> list[int]:
        """Cache values one token takes in each layer (K and V of every KV head, or the latent and its rotated keys)."""
        if self.latent_values is not None:
            return list(self.latent_values)
        return [2 * h * self.head_dim for h in self.kv_heads_per_layer]

    def layer_tokens(self, context: int) -> list[int]:
        """Tokens each layer's cache holds for a sequence of ``context`` tokens."""
        windows = self.windows or (None,) * self.n_layers
        return [min(context, w) if w else context for w in windows]

    def kv_heads_value(self) -> int | list[int]:
        """The KV heads as data: one int when every layer has the same count, else the per-layer list."""
        heads = list(self.kv_heads_per_layer)
        return heads[0] if len(set(heads)) == 1 else heads

    def describe_kv_heads(self) -> str:
        heads = [h for h in self.kv_heads_per_layer]
        if len(set(heads)) == 1:
            return str(heads[0])
        return "per layer " + ",".join(str(h) for h in heads)


def _kv_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().removeprefix("torch.").lower()
    if key not in KV_DTYPES:
        raise GQAUserError(f"unknown KV dtype {dtype!r}; choose one of bfloat16, float16, float32, float8, int8")
    return KV_DTYPES[key]


def kv_bytes_per_token(shape: KVShape, dtype: str = "bfloat16") -> int:
    """KV bytes one token of one sequence takes: sum over layers of 2 x Hkv x head_dim (a latent layer: its
    values, :meth:`KVShape.layer_values`) x element size."""
    return sum(shape.layer_values()) * element_size(_kv_dtype(dtype))


def kv_bytes_per_sequence(shape: KVShape, context: int, dtype: str = "bfloat16") -> int:
    """KV bytes of one sequence of ``context`` tokens: each layer holds ``min(context, window)`` tokens."""
    elem = element_size(_kv_dtype(dtype))
    tokens = shape.layer_tokens(context)
    return sum(n * values * elem for values, n in zip(shape.layer_values(), tokens, strict=True))


def _max_context(shape: KVShape, budget: int, batch: int, dtype: str) -> int | None:
    """The longest context whose cache for ``batch`` sequences fits ``budget`` bytes (None: unbounded,
    every layer slides); the bytes grow monotonically with the context, so a bisection finds it."""
    if shape.windows is not None and all(shape.windows):
        return None if kv_bytes_per_sequence(shape, max(shape.windows), dtype) * batch <= budget else 0
    lo, hi = 0, 2**40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv_bytes_per_sequence(shape, mid, dtype) * batch <= budget else (lo, mid - 1)
    return lo


def kv_shape_from_dict(cfg: dict, name: str = "model") -> KVShape:
    """A transformers ``config.json`` dict (or a gqa ``GQAConfig`` dict) -> :class:`KVShape`.

    Read by the one config reader (:func:`gqa.formats.transformers.spec_from_config`): every integer is
    validated (positive, bounded, KV heads dividing the query heads) before anything is enumerated; bad
    values are one-line :class:`GQAUserError` naming the field.
    """
    from gqa.formats.transformers.config import spec_from_config

    return spec_from_config(cfg).kv_shape(name)


def _kv_shape_from_gguf(path: Path) -> KVShape:
    """The KV shape from the same checked header the loaders read (:func:`gqa.formats.gguf.read_gguf_header`):
    a file ``gqa eval`` refuses, ``gqa memory`` refuses with the same line."""
    from gqa.formats.gguf import read_gguf_header, spec_from_gguf

    return spec_from_gguf(read_gguf_header(path)).kv_shape(path.name)


def load_kv_shape(source: str | Path | dict) -> KVShape:
    """Read a config.json, a model folder (its config.json), a gqa config file or a GGUF file's metadata."""
    if isinstance(source, dict):
        return kv_shape_from_dict(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise GQAUserError(f"{path} does not exist; pass a config.json, a model folder or a .gguf file")
    if path.is_dir():
        for name in ("config.json", "gqa_config.json"):
            if (path / name).is_file():
                return kv_shape_from_dict(_read_json(path / name), path.name)
        raise GQAUserError(f"{path} has no config.json; pass a model folder or the config file itself")
    if path.suffix == ".gguf":
        return _kv_shape_from_gguf(path)
    return kv_shape_from_dict(_read_json(path), path.parent.name if path.name == "config.json" else path.stem)


def _read_json(path: Path) -> dict:
    return read_json_object(path, fix="pass the model's config.json")


def _gqa_kv_heads(n_heads: int, target_group: int = 4) -> int:
    """KV heads of the GQA variant: the divisor of n_heads closest to a group size of 4."""
    divisors = [d for d in range(1, min(n_heads, LIMITS["n_heads"]) + 1) if n_heads % d == 0]
    return min(divisors, key=lambda d: (abs(n_heads // d - target_group), -d))


def memory_report(
    source: str | Path | dict | KVShape,
    *,
    context: int | None = None,
    batch: int = 1,
    budget_gib: float | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """KV-cache figures for a model and its MHA / GQA / MQA variants.

    Args:
        source: config.json / model folder / gqa config / .gguf path, a config dict, or a :class:`KVShape`.
        context: tokens per sequence (default: the model's max context, else 4096).
        batch: sequences held at once.
        budget_gib: a KV memory budget in GiB: adds the largest batch at ``context`` and the longest
            context at ``batch`` that fit.
        dtype: element type of the cache (bfloat16, float16, float32, float8/int8).

    Returns a JSON-ready dict; ``variants`` lists rows with ``kv_heads``, ``kv_bytes_per_token``,
    ``kv_bytes_per_sequence`` (at ``context``), ``kv_bytes_total`` (x ``batch``) and, with a budget,
    ``max_batch`` / ``max_context``. The model's own row is ``model``.
    """
    shape = source if isinstance(source, KVShape) else load_kv_shape(source)
    elem = element_size(_kv_dtype(dtype))
    if context is None:
        context = shape.max_context or 4096
    context = check_int("context", context, limit=2**40, field="context")
    batch = check_int("batch", batch, limit=2**40, field="batch")
    if budget_gib is not None and not (
        isinstance(budget_gib, (int, float))
        and not isinstance(budget_gib, bool)
        and math.isfinite(budget_gib)
        and 0 < budget_gib <= 2**40
    ):
        raise GQAUserError(f"budget must be a positive, finite number of GiB, got {budget_gib!r}; fix --budget")
    hq = shape.n_heads
    variants = [("model", shape)]
    variants += [
        ("MHA", shape.with_kv_heads(hq, "MHA")),
        ("GQA", shape.with_kv_heads(_gqa_kv_heads(hq), "GQA")),
        ("MQA", shape.with_kv_heads(1, "MQA")),
    ]
    rows = []
    budget = None if budget_gib is None else int(budget_gib * GiB)
    for label, v in variants:
        per_token = kv_bytes_per_token(v, dtype)
        per_sequence = kv_bytes_per_sequence(v, context, dtype)
        active = [h for h in v.kv_heads_per_layer if h]
        row = {
            "variant": label,
            "kv_heads": v.kv_heads_value(),  # a number, or one per layer (JSON readers get numbers)
            "group_size": (hq / (sum(active) / len(active))) if active else None,
            "kv_bytes_per_token": per_token,  # while every layer still holds the token
            "kv_bytes_per_sequence": per_sequence,
            "kv_bytes_total": per_sequence * batch,
        }
        if budget is not None:
            row["max_batch"] = budget // per_sequence if per_sequence else None
            row["max_context"] = _max_context(v, budget, batch, dtype) if per_token else None
        rows.append(row)
    model_row = rows[0]
    if budget is not None and model_row["max_batch"] == 0:
        need = model_row["kv_bytes_per_sequence"] / GiB
        raise GQAUserError(
            f"a budget of {budget_gib} GiB is too small for one sequence of {context} tokens "
            f"({need:.3g} GiB in {dtype}); raise --budget or lower --context"
        )
    return {
        "model": shape.name,
        "n_layers": shape.n_layers,
        "n_heads": hq,
        "head_dim": shape.head_dim,
        "dtype": dtype,
        "bytes_per_element": elem,
        "context": context,
        "batch": batch,
        "budget_bytes": budget,
        "kv_bytes_per_token": model_row["kv_bytes_per_token"],
        "kv_bytes_per_sequence": model_row["kv_bytes_per_sequence"],
        "kv_bytes_total": model_row["kv_bytes_total"],
        "windows": None if shape.windows is None else list(shape.windows),
        "variants": rows,
    }
