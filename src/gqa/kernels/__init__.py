"""Decode kernels: a Triton split-KV GQA kernel (CUDA), a fused C++ split-KV kernel (CPU) and a torch
split-KV fallback (CPU, where no compiler is present).

A decode step is memory-bound: it reads ``2 * B * Hkv * S * D * bytes`` of KV cache. Every path reads
each KV byte once per KV head by stacking the g query heads of a group (times the Tq <= 16 query
tokens) as rows of one tile, and splits the KV sequence (across GPU programs or CPU threads), merging
the splits by their log-sum-exp.

Public functions (query head h uses KV head ``h // g``; the Tq query tokens are the **last** Tq
positions of each sequence, so token t of sequence b is at ``lengths[b] - Tq + t``, bottom-right):

* :func:`decode_attention` ``(q, k, v, lengths=None, *, scale, causal=False, window, chunk, num_splits)``:
  contiguous cache, q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, T_max, D]`` (e.g. a static cache's buffers),
  ``lengths`` ``[B]`` int32 tokens per sequence (default ``T_max``).
* :func:`paged_decode_attention` ``(q, k_pages, v_pages, block_table, lengths, *, ..., check_pages)``:
  paged cache, ``k_pages``/``v_pages`` ``[num_pages, Hkv, page_size, D]``, ``block_table``
  ``[B, max_pages_per_seq]`` int32 page ids (key n of sequence b lives in page
  ``block_table[b, n // page_size]``, slot ``n % page_size``), ``lengths`` ``[B]`` int32.
* :func:`gather_pages`: a paged cache to a contiguous copy (for prefill over a paged cache).
* :func:`kernel_mask_args`: a :mod:`gqa.masks` mask as the kernels' ``causal``/``window``/``chunk``
  arguments, or None when they cannot take it (the paged attention layer uses it).

``causal`` defaults to False at every entry point, as ``gqa.attention(mask=None)`` and FlashAttention
do; ``window`` (the last ``window`` keys, itself included) implies causal; ``chunk`` keeps keys in the
query's block of ``chunk`` tokens. Tiles outside a window or a chunk are never read.

Modules: :mod:`~gqa.kernels.dispatch` (these functions and the routing), :mod:`~gqa.kernels.checks`
(input checks), :mod:`~gqa.kernels.cpu_fused` (the C++ kernel, built on first use, with its
fallback), :mod:`~gqa.kernels.cpu` (the torch fallback), :mod:`~gqa.kernels.triton_decode` (CUDA),
:mod:`~gqa.kernels.cpu_step` (the rest of a CPU decode step from the same C++ library: linear layers,
RMSNorm, RoPE; :class:`gqa.layer.Linear`, :class:`gqa.layer.RMSNorm` and :func:`gqa.rope.apply_rope` call it).
Only ``gqa.functional`` routes ``gqa.attention`` here (:func:`supports`, :func:`attention`).
"""

from gqa.kernels.checks import MAX_QUERY_TOKENS
from gqa.kernels.dispatch import (
    CPU_MIN_KEYS,
    FUSED_MIN_KEYS,
    attention,
    cpu_path,
    decode_attention,
    gather_pages,
    kernel_mask_args,
    paged_decode_attention,
    supports,
)

__all__ = [
    "supports",
    "attention",
    "decode_attention",
    "paged_decode_attention",
    "gather_pages",
    "kernel_mask_args",
    "cpu_path",
    "MAX_QUERY_TOKENS",
    "CPU_MIN_KEYS",
    "FUSED_MIN_KEYS",
]
