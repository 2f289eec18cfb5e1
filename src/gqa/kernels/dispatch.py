"""The decode kernels' public functions and their routing to Triton (CUDA), the fused C++ kernel (CPU)
or the torch split-KV path (CPU fallback).

Query head h uses KV head ``h // g``; the Tq query tokens are the **last** Tq positions of each
sequence, so token t of sequence b is at ``lengths[b] - Tq + t`` (bottom-right). ``causal`` defaults
to False at every entry point, like ``gqa.attention(mask=None)`` and FlashAttention's
``flash_attn_with_kvcache``: nothing is masked unless asked. For a single decode token (Tq = 1) the
two are the same; pass ``causal=True`` for several query tokens (speculative verification).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

import torch

from gqa.errors import GQAUserError
from gqa.kernels import cpu_fused
from gqa.kernels.checks import (
    MAX_QUERY_TOKENS,
    check_block_table,
    check_decode_inputs,
    check_scale,
)
from gqa.masks import Causal, Chunked, KeyPadding, Mask, SlidingWindow, as_bool_mask

__all__ = [
    "kernel_mask_args",
    "supports",
    "attention",
    "decode_attention",
    "paged_decode_attention",
    "gather_pages",
    "cpu_path",
    "MAX_QUERY_TOKENS",
    "CPU_MIN_KEYS",
    "FUSED_MIN_KEYS",
]

#: Below this many keys the torch split-KV path's extra ops cost more than its better BLAS shapes save
#: (measured crossover with the grouped path: about 1k keys, 2 EPYC cores, 32 q / 8 kv heads, D = 128).
CPU_MIN_KEYS = 1024
#: Below this many keys the grouped matmul is as fast as the fused C++ kernel (its fixed cost: one
#: parallel region and a merge). Measured (2 shared EPYC cores, 32 q / 8 kv heads, D = 128, Tq = 1):
#: equal at 128 keys in fp32; from 256 keys the kernel is 1.05-1.13x faster in fp32, 1.3-1.5x in bf16.
FUSED_MIN_KEYS = 256
#: Largest head_dim the Triton kernel's tiles hold.
TRITON_MAX_HEAD_DIM = 256

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class _MaskPlan:
    """A mask split into what the kernels handle structurally and what is left over."""

    causal: bool = False
    window: int | None = None
    chunk: int | None = None
    lengths: torch.Tensor | None = None
    start: KeyPadding | None = None  # left padding (KeyPadding(start=...)): a fused-kernel argument on CPU
    rest: list = field(default_factory=list)  # conjuncts only the torch CPU path can apply (materialised)


def _plan(mask) -> _MaskPlan | None:
    plan = _MaskPlan()
    if mask is None:
        return plan
    if isinstance(mask, torch.Tensor):
        plan.rest.append(mask)
        return plan
    if not isinstance(mask, Mask):
        return None
    for part in mask.parts():
        if isinstance(part, Causal):
            plan.causal = True
        elif isinstance(part, SlidingWindow):
            plan.window = part.window if plan.window is None else min(plan.window, part.window)
        elif isinstance(part, Chunked) and plan.chunk in (None, part.chunk):
            plan.chunk = part.chunk
        elif isinstance(part, KeyPadding) and part.lengths is not None and plan.lengths is None:
            plan.lengths = part.lengths
        elif isinstance(part, KeyPadding) and part.start is not None and plan.start is None:
            plan.start = part
        else:
            plan.rest.append(part)
    return plan


def kernel_mask_args(mask) -> dict | None:
    """The decode kernels' ``causal`` / ``window`` / ``chunk`` keyword arguments for ``mask`` (a
    :mod:`gqa.masks` mask or None), or None when the mask has parts they do not take as arguments (key
    padding, tensors, custom functions, two different chunk sizes): the caller then takes a general path.

    ``paged_decode_attention(..., **kernel_mask_args(mask))`` applies ``mask`` bottom-right over each
    sequence's own keys.
    """
    plan = _plan(mask)
    if plan is None or plan.rest or plan.lengths is not None or plan.start is not None:
        return None
    return {"causal": plan.causal, "window": plan.window, "chunk": plan.chunk}


def _triton_ready(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _fused_ok(dtype: torch.dtype, plan: _MaskPlan) -> bool:
    return dtype in cpu_fused.FUSED_DTYPES and not plan.rest and cpu_fused.available()


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> bool:
    """Whether ``gqa.attention`` should run a kernel of this package for these inputs (shapes already
    validated): whether one can (see :func:`attention`) and, on CPU, whether it pays off (at least
    ``FUSED_MIN_KEYS`` keys for the fused kernel, ``CPU_MIN_KEYS`` for the torch split-KV path)."""
    plan = _can_run(q, k, v, mask)
    if plan is None:
        return False
    if q.device.type != "cpu":
        return True
    if q.dtype not in _CPU_DTYPES:
        return False  # fp16/fp64 on CPU: the kernels would compute on a widened copy; grouped does too
    return k.shape[2] >= (FUSED_MIN_KEYS if _fused_ok(q.dtype, plan) else CPU_MIN_KEYS)


def _can_run(q, k, v, mask) -> _MaskPlan | None:
    if q.shape[0] == 0 or not 1 <= q.shape[2] <= min(MAX_QUERY_TOKENS, k.shape[2]):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    plan = _plan(mask)
    if plan is None:
        return None
    if q.device.type == "cpu":
        return plan  # any float dtype: fp16 computes in fp32, fp64 in fp64
    if plan.start is not None:  # the Triton kernel takes no left padding: the general path materialises it
        return None
    width = max(q.shape[3], v.shape[3])
    if _triton_ready(q.device) and q.dtype in _CUDA_DTYPES and width <= TRITON_MAX_HEAD_DIM and not plan.rest:
        return plan
    return None


def cpu_path(dtype: torch.dtype, mask=None) -> str:
    """Which CPU path a decode step with this cache dtype and mask runs: ``"fused"`` (the C++ kernel)
    or ``"torch"`` (the split-KV fallback of :mod:`gqa.kernels.cpu`)."""
    plan = _plan(mask)
    return "fused" if plan is not None and _fused_ok(dtype, plan) else "torch"


def attention(q, k, v, *, mask=None, scale=None):
    """``gqa.attention`` semantics through the decode kernels.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]``; query token t sits at ``Tk - Tq + t``
    (bottom-right).
    Query head h uses KV head ``h // g``. Runs for 1 <= Tq <= min(16, Tk) without autograd: on CUDA
    (Triton) for fp16/bf16/fp32, head_dim <= 256 and masks made of causal, sliding-window, chunked and
    key-padding-lengths parts; on CPU for any float dtype and any mask (the fused kernel for fp32/bf16
    and the mask parts above, the torch split-KV path for any other; fp16 computes in fp32, fp64 in
    fp64). Raises GQAUserError otherwise.
    """
    plan = _can_run(q, k, v, mask)
    if plan is None:
        raise GQAUserError(
            "no decode kernel handles these inputs (Tq <= 16, a supported dtype and mask are needed); "
            "use backend='grouped'"
        )
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else check_scale(scale)
    kv_lens = torch.full((b,), tk, dtype=torch.int32, device=q.device)
    if plan.lengths is not None:
        # Clamp to 0..Tk before narrowing: a length >= 2^31 means every key, not a negative int32.
        lengths = plan.lengths.to(device=q.device, dtype=torch.int64).clamp(0, tk).expand(b)
        kv_lens = lengths.to(torch.int32)
    q_pos0 = torch.full((b,), tk - tq, dtype=torch.int32, device=q.device)
    kw = dict(scale=scale, causal=plan.causal, window=plan.window, chunk=plan.chunk)
    if q.device.type == "cpu":
        start = None if plan.start is None else plan.start.start.to(device=q.device).clamp(0, tk).expand(b)
        fused_kw = dict(kv_start=start, **kw)
        if plan.lengths is None:  # every sequence has all Tk keys: the split count needs no read of kv_lens
            visible = min([tk, *(x + tq - 1 for x in (plan.window, plan.chunk) if x is not None)])
            fused_kw["num_splits"] = cpu_fused.default_splits(b, k.shape[1], visible)
        if q.dtype == torch.float16 and _fused_ok(torch.float32, plan):  # fp16: the fp32 kernel, widened K/V
            return cpu_fused.fused_decode(q, k.float(), v.float(), kv_lens, q_pos0, **fused_kw).to(q.dtype)
        if _fused_ok(q.dtype, plan):
            return cpu_fused.fused_decode(q, k, v, kv_lens, q_pos0, **fused_kw)
        from gqa.kernels.cpu import split_kv_decode_cpu

        extra = None
        for part in plan.rest + ([plan.start] if plan.start is not None else []):
            m = as_bool_mask(part, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
            extra = m if extra is None else extra & m
        return split_kv_decode_cpu(q, k, v, kv_lens, q_pos0, extra_mask=extra, **kw)
    from gqa.kernels.triton_decode import split_kv_decode

    return split_kv_decode(q, k, v, kv_lens, q_pos0, max_visible=_max_visible(tk, tq, plan.window, plan.chunk), **kw)


def _max_visible(t_max: int, tq: int, window: int | None, chunk: int | None) -> int:
    """An upper bound on the keys one sequence's queries see (sizes the KV split without a device sync)."""
    bound = t_max
    if window is not None:
        bound = min(bound, window + tq - 1)
    if chunk is not None:
        bound = min(bound, chunk + tq - 1)
    return max(bound, 1)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
    chunk: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over a contiguous KV cache with per-sequence lengths.

    Args:
        q: ``[B, Hq, Tq, D]``, 1 <= Tq <= 16; token t of sequence b is at position ``lengths[b] - Tq + t``.
        k, v: ``[B, Hkv, T_max, D]`` (Hq divisible by Hkv); slots ``>= lengths[b]`` are never read. v may have
            its own width Dv (e.g. a view of k's first Dv columns), which is then the output's.
        lengths: ``[B]`` int tokens per sequence, new tokens included (default: ``T_max`` for all).
        scale: softmax scale, default ``1 / sqrt(D)``; a finite number > 0.
        causal: each query sees keys up to its own position (bottom-right). Default False, as in
            ``gqa.attention``; the same thing for Tq = 1.
        window: also only the last ``window`` keys (itself included); implies causal.
        chunk: also only keys in the query's block ``[c * chunk, (c + 1) * chunk)``.
        num_splits: KV splits per (sequence, KV head) (default: enough to occupy the GPU / every CPU thread).

    Returns:
        ``[B, Hq, Tq, Dv]`` in q's dtype. Query head h uses KV head ``h // g``; K/V are never repeated.
        B = 0 gives an empty result; head_dim 0 is an error.
    """
    if lengths is None and isinstance(k, torch.Tensor) and k.dim() == 4:
        lengths = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    check_decode_inputs(q, k, v, lengths, window, chunk, scale, "k")
    if q.shape[0] != k.shape[0]:
        raise GQAUserError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}; use one batch size")
    if lengths.numel() and int(lengths.max()) > k.shape[2]:
        raise GQAUserError(f"a length ({int(lengths.max())}) exceeds the cache's {k.shape[2]} slots")
    return _run(q, k, v, lengths, None, scale, causal, window, chunk, num_splits)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
    chunk: int | None = None,
    num_splits: int | None = None,
    check_pages: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache.

    Args:
        q: ``[B, Hq, Tq, D]``, 1 <= Tq <= 16; token t of sequence b is at position ``lengths[b] - Tq + t``.
        k_pages, v_pages: ``[num_pages, Hkv, page_size, D]`` (v_pages may have its own width Dv).
        block_table: ``[B, max_pages_per_seq]`` int32 page ids; key n of sequence b is in page
            ``block_table[b, n // page_size]`` at slot ``n % page_size``. Entries past a sequence's
            last page are never read.
        lengths: ``[B]`` int tokens per sequence, new tokens included.
        scale, causal, window, chunk, num_splits: as in :func:`decode_attention` (causal default False).
        check_pages: verify the page ids in use are in ``0 .. num_pages - 1`` up front (a GQAUserError
            otherwise). On CUDA the check costs a device sync, and ``check_pages=False`` trusts the
            table: an invalid id there is undefined behaviour (the kernel reads whatever memory it points
            at). On CPU an invalid id is always a GQAUserError, whatever ``check_pages`` says: the fused
            kernel checks each id as it reads it, and the torch fallback checks the table first.

    Returns:
        ``[B, Hq, Tq, Dv]`` in q's dtype. Query head h uses KV head ``h // g``.
    """
    check_decode_inputs(q, k_pages, v_pages, lengths, window, chunk, scale, "k_pages")
    # On CPU the fused kernel checks each page id as it reads it (free); the torch fallback gathers pages
    # by indexing, where -1 would silently read the last page, so there the table is always checked.
    cpu_unchecked_ok = q.device.type == "cpu" and q.dtype != torch.float64 and cpu_fused.available()
    # The fused kernel checks ids after narrowing to int32, where 2^32 + 3 would read page 3: such tables
    # get the full check.
    wraps = isinstance(block_table, torch.Tensor) and _wraps_int32(block_table)
    check_block_table(
        block_table, lengths, q.shape[0], k_pages.shape[2], k_pages.shape[0],
        check_pages or not cpu_unchecked_ok or wraps,
    )  # fmt: skip
    return _run(q, k_pages, v_pages, lengths, block_table, scale, causal, window, chunk, num_splits)


def _wraps_int32(table: torch.Tensor) -> bool:
    """Whether an int64 table holds a value that narrowing to int32 would change."""
    if table.dtype != torch.int64 or table.numel() == 0:
        return False
    return int(table.min()) < -(2**31) or int(table.max()) >= 2**31


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, n_pages: int | None = None) -> torch.Tensor:
    """Copy a paged cache into a contiguous one: ``[num_pages, Hkv, P, D]`` -> ``[B, Hkv, n_pages * P, D]``
    using the first ``n_pages`` columns of ``block_table`` ``[B, max_pages]`` (default all)."""
    table = block_table[:, :n_pages] if n_pages is not None else block_table
    b, n = table.shape
    g = pages[table.long()]  # (B, n, Hkv, P, D)
    return g.permute(0, 2, 1, 3, 4).reshape(b, pages.shape[1], n * pages.shape[2], pages.shape[3])


def _run(q, k, v, lengths, block_table, scale, causal, window, chunk, num_splits):
    if q.shape[0] == 0:
        return q.new_empty(*q.shape[:3], v.shape[3])  # (0, Hq, Tq, Dv)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else check_scale(scale)
    kv_lens = lengths.to(device=q.device, dtype=torch.int32)
    q_pos0 = kv_lens - q.shape[2]
    if q.device.type == "cuda":
        width = max(q.shape[3], v.shape[3])
        if q.dtype not in _CUDA_DTYPES or width > TRITON_MAX_HEAD_DIM or not _triton_ready(q.device):
            raise GQAUserError(
                f"the Triton decode kernel needs fp16/bf16/fp32, head_dim <= {TRITON_MAX_HEAD_DIM} and triton "
                f"installed (got {q.dtype}, head_dim {width}); use gqa.attention"
            )
        from gqa.kernels.triton_decode import split_kv_decode

        t_max = block_table.shape[1] * k.shape[2] if block_table is not None else k.shape[2]
        return split_kv_decode(
            q,
            k,
            v,
            kv_lens,
            q_pos0,
            scale=scale,
            causal=causal,
            window=window,
            chunk=chunk,
            block_table=None if block_table is None else block_table.to(torch.int32).contiguous(),
            num_splits=num_splits,
            max_visible=_max_visible(t_max, q.shape[2], window, chunk),
        )
    kw = dict(scale=scale, causal=causal, window=window, chunk=chunk)
    if q.dtype == torch.float16 and cpu_fused.available():  # fp16 on CPU: the fp32 kernel on a widened copy
        return cpu_fused.fused_decode(
            q, k.float(), v.float(), kv_lens, q_pos0, block_table=block_table, num_splits=num_splits, **kw
        ).to(q.dtype)
    if q.dtype in cpu_fused.FUSED_DTYPES and cpu_fused.available():
        return cpu_fused.fused_decode(q, k, v, kv_lens, q_pos0, block_table=block_table, num_splits=num_splits, **kw)
    return _run_torch(q, k, v, kv_lens, q_pos0, block_table, kw)


def _run_torch(q, k, v, kv_lens, q_pos0, block_table, kw):
    """The torch split-KV path (fp64 computes in fp64, fp16 in fp32); a paged cache is gathered one
    sequence at a time (its own pages only)."""
    from gqa.kernels.cpu import split_kv_decode_cpu

    if q.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        return _run_torch(q.float(), k.float(), v.float(), kv_lens, q_pos0, block_table, kw).to(q.dtype)
    if block_table is None:
        return split_kv_decode_cpu(q, k, v, kv_lens, q_pos0, **kw)
    page_size = k.shape[2]
    outs = []
    for i in range(q.shape[0]):  # gather each sequence's own pages only: [1, Hkv, n_pages * P, D]
        n_pages = math.ceil(int(kv_lens[i]) / page_size)
        one = slice(i, i + 1)
        k_i, v_i = gather_pages(k, block_table[one], n_pages), gather_pages(v, block_table[one], n_pages)
        outs.append(split_kv_decode_cpu(q[one], k_i, v_i, kv_lens[one], q_pos0[one], **kw))
    return torch.cat(outs, dim=0)  # (B, Hq, Tq, D)
