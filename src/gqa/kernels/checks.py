"""Input checks shared by ``gqa.attention`` and the decode kernels: one-line :class:`GQAUserError`
messages that say what is wrong and how to fix it."""

from __future__ import annotations

import math
import numbers

import torch

from gqa.errors import GQAUserError

__all__ = ["check_scale", "check_tensors", "check_decode_inputs", "check_block_table", "MAX_QUERY_TOKENS"]

#: Query tokens per sequence the decode kernels take (decode and speculative verification).
MAX_QUERY_TOKENS = 16


def check_scale(scale) -> float | None:
    """None, or a finite number > 0 (returned as float)."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise GQAUserError(f"scale must be a positive number or None, got {type(scale).__name__}; e.g. 1 / sqrt(D)")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise GQAUserError(f"scale must be a finite number > 0, got {scale!r}; pass None for 1 / sqrt(head_dim)")
    return scale


def check_tensors(q, k, v, kv_name: str = "k") -> None:
    """4-D floating tensors of one dtype on one device, head_dim >= 1 (q's and k's the same; v's may differ: its
    head_dim is the output's), Hkv dividing Hq."""
    for name, t in (("q", q), (kv_name, k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise GQAUserError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise GQAUserError(
                f"{name} must have 4 dims [B, H, T, D], got shape {tuple(t.shape)}; "
                "add a batch dim with .unsqueeze(0) or transpose [B, T, H, D] with .transpose(1, 2)"
            )
        if not t.dtype.is_floating_point:
            raise GQAUserError(f"{name} must be a floating-point tensor, got {t.dtype}; cast it with .float()")
    if not (q.dtype == k.dtype == v.dtype):
        raise GQAUserError(f"q, {kv_name}, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise GQAUserError(f"q, {kv_name}, v are on different devices ({q.device}, {k.device}, {v.device}); move them")
    if q.shape[3] != k.shape[3]:
        raise GQAUserError(
            f"head_dim differs: q {q.shape[3]}, {kv_name} {k.shape[3]}; queries and keys need the same head_dim"
        )
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise GQAUserError("head_dim is 0; q, k and v need head_dim >= 1")
    hq, hkv = q.shape[1], k.shape[1]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise GQAUserError(
            f"Hq={hq} query heads is not a positive multiple of Hkv={hkv} KV heads; choose Hkv among the divisors of Hq"
        )


def check_decode_inputs(q, k, v, lengths, window, chunk, scale, kv_name: str) -> None:
    """The decode kernels' arguments (shapes of the cache itself are checked by the callers)."""
    check_tensors(q, k, v, kv_name)
    if k.shape[:3] != v.shape[:3]:
        raise GQAUserError(f"{kv_name} {tuple(k.shape)} and v {tuple(v.shape)} differ; pass matching K/V")
    tq = q.shape[2]
    if not 1 <= tq <= MAX_QUERY_TOKENS:
        raise GQAUserError(f"decode kernels take 1..{MAX_QUERY_TOKENS} query tokens, got Tq={tq}; use gqa.attention")
    for name, val in (("window", window), ("chunk", chunk)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise GQAUserError(f"{name} must be an integer >= 1 or None, got {val!r}")
    check_scale(scale)
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != q.shape[0]:
        raise GQAUserError(f"lengths must be a 1-D int tensor [B={q.shape[0]}], got {lengths!r:.80}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise GQAUserError(f"lengths must be an integer tensor, got {lengths.dtype}; use .to(torch.int32)")
    if lengths.numel() and int(lengths.min()) < tq:
        raise GQAUserError(
            f"every length must be >= Tq={tq} (the query tokens are the last Tq of each sequence), "
            f"got min {int(lengths.min())}"
        )


def check_block_table(block_table, lengths, batch: int, page_size: int, num_pages: int, check_pages: bool) -> None:
    """Shape and dtype of the block table; and, when ``check_pages``, that every page id a sequence uses
    is in ``0 .. num_pages - 1``."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise GQAUserError(f"block_table must be an int tensor [B={batch}, max_pages_per_seq]")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise GQAUserError(f"block_table must hold int32 page ids, got {block_table.dtype}; use .to(torch.int32)")
    if lengths.numel() and int(lengths.max()) > block_table.shape[1] * page_size:
        raise GQAUserError(
            f"a length ({int(lengths.max())}) exceeds block_table's {block_table.shape[1]} pages x {page_size} slots"
        )
    if check_pages:
        slots = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size
        ids = block_table[slots < lengths.to(block_table.device)[:, None]]  # page ids of pages in use
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise GQAUserError(
                f"block_table holds page ids outside 0..{num_pages - 1} for pages in use "
                f"(min {int(ids.min())}, max {int(ids.max())}); fix the table"
            )
