"""Dtype and device names and byte sizes: the one place that parses a dtype or device name and computes
KV bytes per token.

KV bytes per token = 2 (K and V) x sum over layers of Hkv_i x head_dim x bytes per element.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gqa.errors import GQAUserError
from gqa.formats.dtypes import user_names

__all__ = ["DTYPES", "parse_dtype", "dtype_name", "element_size", "kv_bytes_per_token", "parse_device", "check_seed", "derived_seed", "check_threads"]

#: Dtype names accepted everywhere (CLI options, configs, reports), with common aliases: the user rows of
#: the one dtype table (:mod:`gqa.formats.dtypes`).
DTYPES: dict[str, torch.dtype] = user_names()


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


def parse_device(value: str | torch.device | None) -> torch.device | None:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a torch device -> ``torch.device``; None stays None.

    A malformed name, or a CUDA device on a machine (or torch build) without one, is a
    :class:`GQAUserError` saying what to use instead, before anything is allocated on it.
    """
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise GQAUserError(f"unknown device {value!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GQAUserError(f"device {value!r} needs a CUDA GPU and a CUDA build of torch; this machine has none: use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GQAUserError(f"device {value!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise GQAUserError(f"device {value!r} is not supported; use cpu, cuda or cuda:N")
    return device


#: Seeds are what a torch.Generator takes: 0 .. 2^64 - 1.
SEED_LIMIT = 2**64


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` if it is a whole number in 0 .. 2^64 - 1, else a one-line :class:`GQAUserError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise GQAUserError(f"{what} must be a whole number in 0 .. 2^64 - 1, got {seed!r}; pick a smaller seed")
    return seed


def derived_seed(seed: int, part: int) -> int:
    """The seed of one part (a layer, a step, a sequence) of a run seeded with ``seed``: any seed torch
    accepts gives one torch accepts (the same values as ``seed * 1_000_003 + part`` below 2^64)."""
    return (seed * 1_000_003 + part) % SEED_LIMIT


def check_threads(threads, what: str = "--threads") -> int | None:
    """None (torch's choice) or a thread count in 1 .. 4 x the logical CPUs, else a one-line
    :class:`GQAUserError`: past that only oversubscribes, and OpenMP crashes on absurd counts (100,000)."""
    import os

    if threads is None:
        return None
    limit = 4 * (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise GQAUserError(f"{what} must be a whole number in 1 .. {limit} (4 x this machine's CPUs), got {threads!r}")
    return threads
