"""Dtype names and byte sizes: the one place that parses a dtype name and computes KV bytes per token.

KV bytes per token = 2 (K and V) x sum over layers of Hkv_i x head_dim x bytes per element.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gqa.errors import GQAUserError

__all__ = ["DTYPES", "parse_dtype", "dtype_name", "element_size", "kv_bytes_per_token"]

#: Dtype names accepted everywhere (CLI options, configs, reports), with common aliases.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, *, allowed: Iterable[str] | None = None) -> torch.dtype | None:
    """``"bf16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None.

    allowed: canonical names accepted here (e.g. ``("float32", "bfloat16", "float16")``); anything else,
    including an unknown name, is a :class:`GQAUserError` naming the choices. Never a silent fallback.
    """
    if value is None:
        return None
    choices = list(allowed) if allowed is not None else sorted({dtype_name(d) for d in DTYPES.values()})
    if isinstance(value, torch.dtype):
        dt = value
    elif isinstance(value, str):
        dt = DTYPES.get(value.strip().lower().removeprefix("torch."))
        if dt is None:
            raise GQAUserError(f"unknown dtype {value!r}; choose one of {', '.join(choices)}")
    else:
        raise GQAUserError(f"dtype must be a name such as 'bfloat16', got {value!r}")
    if dtype_name(dt) not in choices:
        raise GQAUserError(f"dtype {dtype_name(dt)} is not supported here; choose one of {', '.join(choices)}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name written in configs and reports)."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype | str) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or a name ``parse_dtype`` accepts)."""
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dt).element_size()


def kv_bytes_per_token(kv_heads_per_layer: Iterable[int], head_dim: int, dtype: torch.dtype | str) -> int:
    """KV-cache bytes one token of one sequence takes: 2 x sum(Hkv_i) x head_dim x element size."""
    return 2 * sum(int(h) for h in kv_heads_per_layer) * int(head_dim) * element_size(dtype)
