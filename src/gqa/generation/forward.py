"""A lean model forward for generation, shared by the static and the paged cache.

It runs the model's own modules (embedding, norms, projections, MLP) and takes the attention over
the cache as a callback, so one forward serves both cache layouts. Decode steps are dominated by
small ops on CPU, so it also computes each RoPE table once per step instead of once per layer, and
runs the LM head only on the positions whose logits are needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gqa.rope import apply_rope, rope_cos_sin

__all__ = ["cached_forward", "Attend"]

#: attend(layer index, q [B, Hq, T, D], k_new [B, Hkv, T, D], v_new [B, Hkv, T, D]) -> out [B, Hq, T, D].
#: It stores k_new/v_new in its cache and attends over everything the cache holds for each sequence.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cached_forward(
    model, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, *, last_only: bool = True
) -> torch.Tensor:
    """input_ids ``[B, T]`` at RoPE ``positions`` ``[B, T]`` -> logits ``[B, 1, vocab]`` (last position)
    or ``[B, T, vocab]`` with ``last_only=False``.

    Computes exactly what :meth:`gqa.GQAForCausalLM.forward` computes when ``attend`` attends the way
    the model's mask does; query head h reads KV head ``h // g`` inside ``attend``.
    """
    b, t = input_ids.shape
    x = model.embed(input_ids)  # (B, T, d_model)
    rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.layers):
        attn = block.attn
        h = block.attn_norm(x)
        q = attn.q_proj(h).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = attn.k_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope_theta is not None:
            key = (attn.head_dim, attn.rope_theta)  # layers with the same frequencies share one table
            if key not in rope_tables:
                rope_tables[key] = rope_cos_sin(positions, attn.inv_freq)  # (B, T, D) each
            cos, sin = rope_tables[key]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(i, q, k, v)  # (B, Hq, T, D)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        x = x + block.mlp(block.mlp_norm(x))
    if last_only:
        x = x[:, -1:]  # (B, 1, d_model)
    return model.lm_head(model.norm(x))  # (B, 1 | T, vocab)
