"""A forward pass of :class:`gqa.GQAForCausalLM` that reads and writes a :class:`gqa.cache.PagedKVCache`.

It runs the model's own modules (embedding, norms, projections, RoPE, MLP) and replaces only the
attention over the cache: new K/V go into each sequence's pages and the queries attend over the
pages through :func:`gqa.cache.paged.paged_attention` (the paged decode kernel for decode steps).
"""

from __future__ import annotations

import torch

from gqa.cache.paged import PagedKVCache, paged_attention
from gqa.rope import apply_rope, rope_cos_sin

__all__ = ["paged_forward"]


def _attention_block(attn, x, positions, cache: PagedKVCache, layer: int, seqs, table, lengths_after, window):
    """The :class:`gqa.GroupedQueryAttention` computation with the paged cache. x [B, T, d_model]."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, Hq, T, D)
    k = attn.k_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope_theta is not None:
        cos, sin = rope_cos_sin(positions, attn.inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache.write(layer, seqs, k, v, block_table=table)
    out = paged_attention(q, cache.k_pages[layer], cache.v_pages[layer], table, lengths_after, window=window)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))  # (B, T, d_model)


@torch.inference_mode()
def paged_forward(model, input_ids: torch.Tensor, cache: PagedKVCache, seqs: list) -> torch.Tensor:
    """input_ids ``[B, T]`` (T new tokens for each of ``seqs``) -> logits ``[B, T, vocab]``.

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
    x = model.embed(input_ids)  # (B, T, d_model)
    for i, block in enumerate(model.layers):
        x = x + _attention_block(
            block.attn, block.attn_norm(x), positions, cache, i, seqs, table, lengths_after, window
        )
        x = x + block.mlp(block.mlp_norm(x))
    cache.advance(seqs, t)
    return model.lm_head(model.norm(x))  # (B, T, vocab)
