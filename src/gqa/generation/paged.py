"""A forward pass of :class:`gqa.GQAForCausalLM` that reads and writes a :class:`gqa.cache.PagedKVCache`.

New K/V go into each sequence's pages and the queries attend over the pages through
:func:`gqa.cache.paged.paged_attention` (the paged decode kernel for decode steps); everything else is
the model's own modules (see :func:`gqa.generation.forward.cached_forward`).
"""

from __future__ import annotations

import torch

from gqa.cache.paged import PagedKVCache, paged_attention
from gqa.generation.forward import cached_forward

__all__ = ["paged_forward"]


@torch.inference_mode()
def paged_forward(
    model, input_ids: torch.Tensor, cache: PagedKVCache, seqs: list, *, last_only: bool = False
) -> torch.Tensor:
    """input_ids ``[B, T]`` (T new tokens for each of ``seqs``) -> logits ``[B, T, vocab]``
    (``[B, 1, vocab]`` with ``last_only``).

    Each sequence's new tokens sit at positions ``cache.length(seq) ..``; pages for them must have
    been reserved (:meth:`PagedKVCache.reserve`). The lengths advance by T once all layers ran.
    No padding is involved: a prefill of prompts with different lengths runs one call per prompt.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != len(seqs):
        raise ValueError(f"input_ids must be [B={len(seqs)}, T], got {tuple(input_ids.shape)}")
    if cache.num_layers != len(model.layers):
        raise ValueError(f"the paged cache has {cache.num_layers} layers but the model has {len(model.layers)}")
    device = input_ids.device
    t = input_ids.shape[1]
    table = cache.block_table(seqs, device)  # (B, max_pages)
    start = cache.lengths(seqs, device)  # (B,) int32
    positions = start.long()[:, None] + torch.arange(t, device=device)  # (B, T)
    lengths_after = start + t  # (B,)
    window = model.config.sliding_window

    def attend(layer: int, q, k, v):
        cache.write(layer, seqs, k, v, block_table=table)
        return paged_attention(q, cache.k_pages[layer], cache.v_pages[layer], table, lengths_after, window=window)

    logits = cached_forward(model, input_ids, positions, attend, last_only=last_only)
    cache.advance(seqs, t)
    return logits
