"""Decode kernels: a Triton split-KV GQA kernel (CUDA) and a split-KV CPU path.

A decode step is memory-bound: it reads ``2 * B * Hkv * S * D * bytes`` of KV cache. Both paths read
each KV byte once per KV head by stacking the g query heads of a group (times the Tq <= 16 query
tokens) as rows of one tile, and split the KV sequence (across GPU programs, or across CPU threads),
merging the splits by log-sum-exp (GPU) or by summing chunked products of a global softmax (CPU).

Public functions (query head h uses KV head ``h // g``; the Tq query tokens are the **last** Tq
positions of each sequence, so token t of sequence b is at ``lengths[b] - Tq + t``, bottom-right):

* :func:`decode_attention` ``(q, k, v, lengths=None, *, scale, causal, window, chunk, num_splits)``:
  contiguous cache, q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, T_max, D]`` (e.g. a static cache's buffers),
  ``lengths`` ``[B]`` int32 tokens per sequence (default ``T_max``).
* :func:`paged_decode_attention` ``(q, k_pages, v_pages, block_table, lengths, *, ...)``: paged cache,
  ``k_pages``/``v_pages`` ``[num_pages, Hkv, page_size, D]``, ``block_table`` ``[B, max_pages_per_seq]``
  int32 page ids (key n of sequence b lives in page ``block_table[b, n // page_size]``, slot
  ``n % page_size``), ``lengths`` ``[B]`` int32.

Both take ``causal=True`` (each query sees keys up to its own position), ``window`` (the last
``window`` keys, itself included, as :func:`gqa.masks.sliding_window`) and ``chunk`` (only keys in the
query's block of ``chunk`` tokens, as :func:`gqa.masks.chunked`); whole tiles outside a window or a
chunk are never read. On CUDA (fp16/bf16/fp32, head_dim <= 256) they run the Triton kernel of
:mod:`gqa.kernels.triton_decode`; on CPU the path of :mod:`gqa.kernels.cpu` (a paged cache is gathered
first).

The dispatcher in :mod:`gqa.functional` calls :func:`supports` and :func:`attention`: ``gqa.attention``
routes decode (Tq <= 16) here on CUDA when the mask is a combination of causal, sliding-window,
chunked and key-padding lengths, and on CPU (fp32/bf16) once the cache holds at least
``CPU_MIN_KEYS`` keys, for any mask.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from gqa.masks import Causal, Chunked, KeyPadding, Mask, SlidingWindow, as_bool_mask

__all__ = [
    "supports",
    "attention",
    "decode_attention",
    "paged_decode_attention",
    "gather_pages",
    "MAX_QUERY_TOKENS",
    "CPU_MIN_KEYS",
]

#: Query tokens per sequence the kernels take (decode and speculative verification).
MAX_QUERY_TOKENS = 16
#: Below this many keys the CPU path's extra ops cost more than its better BLAS shapes save
#: (measured crossover with the grouped path: about 1k keys, 2 EPYC cores, 32 q / 8 kv heads, D = 128).
CPU_MIN_KEYS = 1024
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
    rest: list | None = None  # conjuncts only the CPU path can apply (materialised)


def _plan(mask) -> _MaskPlan | None:
    plan = _MaskPlan(rest=[])
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
        else:
            plan.rest.append(part)
    return plan


def _triton_ready(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> bool:
    """Whether ``gqa.attention`` should run a kernel of this package for these inputs (shapes already
    validated): whether one can (see :func:`attention`) and, on CPU, whether it pays off
    (at least ``CPU_MIN_KEYS`` keys)."""
    if not _can_run(q, k, v, mask):
        return False
    return q.device.type != "cpu" or k.shape[2] >= CPU_MIN_KEYS


def _can_run(q, k, v, mask) -> bool:
    if not 1 <= q.shape[2] <= min(MAX_QUERY_TOKENS, k.shape[2]):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    plan = _plan(mask)
    if plan is None:
        return False
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if _triton_ready(q.device):
        return q.dtype in _CUDA_DTYPES and q.shape[3] <= TRITON_MAX_HEAD_DIM and not plan.rest
    return False


def attention(q, k, v, *, mask=None, scale=None):
    """``gqa.attention`` semantics through the decode kernels.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; query token t sits at ``Tk - Tq + t`` (bottom-right).
    Query head h uses KV head ``h // g``. Runs for 1 <= Tq <= min(16, Tk) without autograd: on CUDA
    (Triton) for fp16/bf16/fp32, head_dim <= 256 and masks made of causal, sliding-window, chunked and
    key-padding-lengths parts; on CPU for fp32/bf16 and any mask. Raises ValueError otherwise.
    """
    if not _can_run(q, k, v, mask):
        raise ValueError(
            "no decode kernel handles these inputs (Tq <= 16, a supported dtype and mask are needed); "
            "use backend='grouped'"
        )
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    plan = _plan(mask)
    kv_lens = torch.full((b,), tk, dtype=torch.int32, device=q.device)
    if plan.lengths is not None:
        kv_lens = torch.minimum(kv_lens, plan.lengths.to(device=q.device, dtype=torch.int32).expand(b))
    q_pos0 = torch.full((b,), tk - tq, dtype=torch.int32, device=q.device)
    kw = dict(scale=scale, causal=plan.causal, window=plan.window, chunk=plan.chunk)
    if q.device.type == "cpu":
        from gqa.kernels.cpu import split_kv_decode_cpu

        extra = None
        for part in plan.rest:
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


def _check_common(q, k, v, lengths, window, chunk, scale, kv_dim_name):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}; see the gqa.kernels docstring")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ; pass matching K/V")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq={hq} query heads is not divisible by Hkv={hkv} KV heads; choose Hkv among its divisors")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q {q.shape[3]}, {kv_dim_name} {k.shape[3]}; they must match")
    tq = q.shape[2]
    if not 1 <= tq <= MAX_QUERY_TOKENS:
        raise ValueError(f"decode kernels take 1..{MAX_QUERY_TOKENS} query tokens, got Tq={tq}; use gqa.attention")
    for name, val in (("window", window), ("chunk", chunk)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {val!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != q.shape[0]:
        raise ValueError(f"lengths must be a 1-D int tensor [B={q.shape[0]}], got {lengths!r:.80}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}; use .to(torch.int32)")
    if int(lengths.min()) < tq:
        raise ValueError(
            f"every length must be >= Tq={tq} (the query tokens are the last Tq of each sequence), "
            f"got min {int(lengths.min())}"
        )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over a contiguous KV cache with per-sequence lengths.

    Args:
        q: ``[B, Hq, Tq, D]``, 1 <= Tq <= 16; token t of sequence b is at position ``lengths[b] - Tq + t``.
        k, v: ``[B, Hkv, T_max, D]`` (Hq divisible by Hkv); slots ``>= lengths[b]`` are ignored.
        lengths: ``[B]`` int tokens per sequence, new tokens included (default: ``T_max`` for all).
        scale: softmax scale, default ``1 / sqrt(D)``.
        causal: each query sees keys up to its own position (bottom-right).
        window: also only the last ``window`` keys (itself included); implies causal.
        chunk: also only keys in the query's block ``[c * chunk, (c + 1) * chunk)``.
        num_splits: KV splits of the Triton kernel (default: enough to fill the GPU). Ignored on CPU.

    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype. Query head h uses KV head ``h // g``; K/V are never repeated.
    """
    if lengths is None and isinstance(k, torch.Tensor) and k.dim() == 4:
        lengths = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    _check_common(q, k, v, lengths, window, chunk, scale, "k")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}; use one batch size")
    if int(lengths.max()) > k.shape[2]:
        raise ValueError(f"a length ({int(lengths.max())}) exceeds the cache's {k.shape[2]} slots")
    return _run(q, k, v, lengths, None, scale, causal, window, chunk, num_splits)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    num_splits: int | None = None,
    check_pages: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache.

    Args:
        q: ``[B, Hq, Tq, D]``, 1 <= Tq <= 16; token t of sequence b is at position ``lengths[b] - Tq + t``.
        k_pages, v_pages: ``[num_pages, Hkv, page_size, D]``.
        block_table: ``[B, max_pages_per_seq]`` int32 page ids; key n of sequence b is in page
            ``block_table[b, n // page_size]`` at slot ``n % page_size``. Entries past a sequence's
            last page are never read.
        lengths: ``[B]`` int tokens per sequence, new tokens included.
        scale, causal, window, chunk, num_splits: as in :func:`decode_attention`.
        check_pages: verify the page ids in use are valid (one device sync; turn off in a tuned loop).

    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype. Query head h uses KV head ``h // g``.
    """
    _check_common(q, k_pages, v_pages, lengths, window, chunk, scale, "k_pages")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be an int tensor [B={q.shape[0]}, max_pages_per_seq]")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must hold int32 page ids, got {block_table.dtype}; use .to(torch.int32)")
    page_size = k_pages.shape[2]
    if int(lengths.max()) > block_table.shape[1] * page_size:
        raise ValueError(
            f"a length ({int(lengths.max())}) exceeds block_table's {block_table.shape[1]} pages x {page_size} slots"
        )
    if check_pages:
        slots = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size
        ids = block_table[slots < lengths.to(block_table.device)[:, None]]  # page ids of pages in use
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_pages.shape[0]):
            raise ValueError(
                f"block_table holds page ids outside 0..{k_pages.shape[0] - 1} for pages in use; fix the table"
            )
    return _run(q, k_pages, v_pages, lengths, block_table, scale, causal, window, chunk, num_splits)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, n_pages: int | None = None) -> torch.Tensor:
    """Copy a paged cache into a contiguous one: ``[num_pages, Hkv, P, D]`` -> ``[B, Hkv, n_pages * P, D]``
    using the first ``n_pages`` columns of ``block_table`` ``[B, max_pages]`` (default all)."""
    table = block_table[:, :n_pages] if n_pages is not None else block_table
    b, n = table.shape
    g = pages[table.long()]  # (B, n, Hkv, P, D)
    return g.permute(0, 2, 1, 3, 4).reshape(b, pages.shape[1], n * pages.shape[2], pages.shape[3])


def _run(q, k, v, lengths, block_table, scale, causal, window, chunk, num_splits):
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    kv_lens = lengths.to(device=q.device, dtype=torch.int32)
    q_pos0 = kv_lens - q.shape[2]
    if q.device.type == "cuda":
        if q.dtype not in _CUDA_DTYPES or q.shape[3] > TRITON_MAX_HEAD_DIM or not _triton_ready(q.device):
            raise ValueError(
                f"the Triton decode kernel needs fp16/bf16/fp32, head_dim <= {TRITON_MAX_HEAD_DIM} and triton "
                f"installed (got {q.dtype}, head_dim {q.shape[3]}); use gqa.attention"
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
    from gqa.kernels.cpu import split_kv_decode_cpu

    kw = dict(scale=scale, causal=causal, window=window, chunk=chunk)
    if q.dtype not in _CPU_DTYPES:  # fp16/fp64 on CPU: compute in fp32
        return _run(q.float(), k.float(), v.float(), lengths, block_table, scale, causal, window, chunk, None).to(
            q.dtype
        )
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
