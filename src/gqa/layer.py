"""``GroupedQueryAttention``: the nn.Module around :func:`gqa.attention` (projections, RoPE, QK-norm, cache)."""

from __future__ import annotations

import torch
from torch import nn

from gqa import masks
from gqa.cache import KVCache
from gqa.functional import attention
from gqa.rope import apply_rope, rope_cos_sin, rope_frequencies

__all__ = ["GroupedQueryAttention", "RMSNorm"]

_CAUSAL = masks.causal()


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as transformers' Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """Multi-head self-attention where ``n_heads`` query heads share ``n_kv_heads`` K/V heads.

    Query head h uses KV head ``h // (n_heads // n_kv_heads)``: with 8 query heads and 2 KV heads,
    heads 0-3 share KV head 0 and heads 4-7 share KV head 1. n_kv_heads = n_heads is MHA,
    n_kv_heads = 1 is MQA.

    Args:
        d_model: model width.
        n_heads: query heads Hq.
        n_kv_heads: key/value heads Hkv (a divisor of Hq).
        head_dim: per-head width D (default d_model // n_heads).
        rope_theta: RoPE base; None disables RoPE.
        qkv_bias / o_bias: biases on the q/k/v and output projections.
        qk_norm: RMSNorm over each head's q and k before RoPE (Qwen3, OLMo2 style).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        *,
        rope_theta: float | None = 10000.0,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; "
                f"choose n_kv_heads among the divisors of {n_heads}"
            )
        head_dim = head_dim or d_model // n_heads
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope_theta = rope_theta
        if rope_theta is not None:
            self.register_buffer("inv_freq", rope_frequencies(head_dim, rope_theta), persistent=False)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: masks.Mask | torch.Tensor | None = _CAUSAL,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        positions: RoPE positions, ``[T]`` or ``[B, T]`` (default: ``cache.length + arange(T)``).
        cache: this layer's :class:`gqa.KVCache`; new K/V are written at slots ``cache.length ..``
            and attention runs over every filled slot.
        mask: over cache slots, aligned bottom-right (default causal); None attends everywhere.
        """
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, start+T, D) views of the cache
        out = attention(q, k, v, mask=mask)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
