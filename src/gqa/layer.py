"""``GroupedQueryAttention``: the nn.Module around :func:`gqa.attention` (projections, RoPE, QK-norm, cache),
and :func:`paged_attention`, attention over a paged cache's pages.

The layer calls its cache through the one interface of :mod:`gqa.cache` (``positions``, ``update``) and
runs the attention over what ``update`` returns: :func:`gqa.attention` for a static cache's contiguous
``(k, v)``, :func:`paged_attention` for a paged cache's :class:`gqa.cache.PagedKV`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module  # the global hook registries (project)

from gqa import kernels, masks
from gqa.cache import PagedKV
from gqa.cache.dynamic import MappedKV
from gqa.errors import GQAUserError
from gqa.functional import attention
from gqa.kernels import cpu_step
from gqa.rope import apply_rope, rope_cos_sin, rope_frequencies

__all__ = ["GroupedQueryAttention", "Linear", "RMSNorm", "paged_attention", "project"]

_CAUSAL = masks.causal()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and hooks) whose forward runs the decode GEMV kernel of
    :mod:`gqa.kernels.cpu_step` for the few rows of a decode step, and ``F.linear`` for everything else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_step.linear(x, self.weight, self.bias)


def project(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``, as one fused GEMV call when every module is a plain :class:`Linear`
    (no hooks, so nothing observing a module is skipped): a decode step's Q, K and V, or gate and up."""
    plain = not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks) and all(
        type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules
    )
    if not plain:
        return [m(x) for m in modules]
    return cpu_step.linears(x, [m.weight for m in modules], [m.bias for m in modules])


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back: before the scale (transformers' Llama) or, with
    ``scale_fp32``, after it (Gemma, whose stored scale ``w`` acts as ``1 + w``: gqa keeps ``1 + w``)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, scale_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_fp32 = scale_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = cpu_step.rms_norm(x, self.weight, self.eps, self.scale_fp32)  # a decode step's rows on CPU
        if fused is not None:
            return fused
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32; float64 stays float64
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_fp32:
            return (xf * self.weight.to(xf.dtype)).to(x.dtype)
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
        scale: softmax scale (default head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
        norm_scale_fp32: the q/k norms scale in fp32 (Gemma; see :class:`RMSNorm`).
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
        scale: float | None = None,
        norm_scale_fp32: bool = False,
    ):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise GQAUserError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; "
                f"choose n_kv_heads among the divisors of {n_heads}"
            )
        head_dim = head_dim or d_model // n_heads
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps, scale_fp32=norm_scale_fp32) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, scale_fp32=norm_scale_fp32) if qk_norm else None
        self.scale = scale
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
        cache=None,
        mask: masks.Mask | torch.Tensor | None = _CAUSAL,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        positions: RoPE positions, ``[T]`` or ``[B, T]`` (default: ``cache.positions(T)``, e.g.
            ``cache.length + arange(T)`` for a :class:`gqa.KVCache`; ``arange(T)`` without a cache).
        cache: this layer's cache (see :mod:`gqa.cache`): a :class:`gqa.KVCache` or a layer of a
            :class:`gqa.cache.PagedBatch`. The new K/V are stored after what it holds and attention runs
            over everything it holds.
        mask: aligned bottom-right over the cached keys (default causal); None attends everywhere.
        rope: precomputed ``(cos, sin)`` for ``positions`` (:func:`gqa.rope.rope_cos_sin` with this
            layer's ``inv_freq``; the model computes them once per call for all layers).
        """
        b, t, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            if rope is None:
                if positions is None:
                    positions = cache.positions(t, x.device) if cache is not None else torch.arange(t, device=x.device)
                rope = rope_cos_sin(positions, self.inv_freq)
            cos, sin = rope  # (T, D) or (B, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv = cache.update(k, v) if cache is not None else (k, v)
        out = attend(q, kv, mask, scale=self.scale)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def attend(q: torch.Tensor, kv, mask: masks.Mask | torch.Tensor | None, *, scale: float | None = None) -> torch.Tensor:
    """Attention of q ``[B, Hq, Tq, D]`` over what a layer cache's ``update`` returned (see :mod:`gqa.cache`):
    ``(k, v)`` ``[B, Hkv, Tk, D]`` or a :class:`gqa.cache.PagedKV`. Query head h reads KV head ``h // g``;
    the mask is aligned bottom-right; ``scale`` defaults to ``D ** -0.5``. Returns ``[B, Hq, Tq, D]``.
    A :class:`gqa.cache.dynamic.MappedKV` (per-sequence head maps, dynamic grouping) runs the same attention
    with the query heads stacked by the slot they read."""
    if isinstance(kv, MappedKV):
        return kv.head_map.unstack(attend(kv.head_map.stack(q), kv.kv, mask, scale=scale))
    if isinstance(kv, PagedKV):
        return paged_attention(q, kv, mask=mask, scale=scale)
    k, v = kv
    if q.shape[2] == 1 and isinstance(mask, (masks.Causal, masks.SlidingWindow)):
        # One query at the last position: causal hides nothing, and a window keeps the last `window`
        # keys. Slicing instead of masking lets decode run the unmasked (cheapest) attention path.
        if isinstance(mask, masks.SlidingWindow):
            k, v = k[:, :, -mask.window :], v[:, :, -mask.window :]  # (B, Hkv, min(window, Tk), D)
        mask = None
    return attention(q, k, v, mask=mask, scale=scale)


def paged_attention(
    q: torch.Tensor,
    kv: PagedKV,
    *,
    mask: masks.Mask | None = _CAUSAL,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of new queries over a paged cache.

    q ``[B, Hq, Tq, D]`` are the last Tq tokens of each sequence: token t of sequence b is at position
    ``kv.lengths[b] - Tq + t``. ``kv``: k/v pages ``[num_pages, Hkv, P, D]``, block table ``[B, max_pages]``
    int32, lengths ``[B]`` (new tokens included). ``mask`` (a :mod:`gqa.masks` mask, default causal;
    None attends everywhere) applies bottom-right over each sequence's own ``lengths[b]`` keys. Query
    head h uses KV head ``h // (Hq // Hkv)``. Returns ``[B, Hq, Tq, D]``.

    Decode-sized queries (Tq <= ``gqa.kernels.MAX_QUERY_TOKENS``) with a mask made of causal,
    sliding-window and chunked parts run :func:`gqa.kernels.paged_decode_attention`. Anything else
    (prefill, other masks) gathers each sequence's pages into a contiguous copy of its own keys
    (:func:`gqa.kernels.gather_pages`) and runs :func:`gqa.attention` with the same mask.
    """
    if isinstance(mask, torch.Tensor) or (
        isinstance(mask, masks.Mask) and any(isinstance(p, masks.KeyPadding) for p in mask.parts())
    ):
        raise GQAUserError(
            "a paged cache takes position masks (causal, sliding window, chunked, custom functions): it holds no "
            "padding and each sequence has its own key count; drop key_valid / the tensor mask"
        )
    tq = q.shape[2]
    plan = kernels.kernel_mask_args(mask)
    if plan is not None and tq <= kernels.MAX_QUERY_TOKENS:
        # The block table comes from the cache's own allocator, so the page-id check is skipped.
        return kernels.paged_decode_attention(
            q, kv.k_pages, kv.v_pages, kv.block_table, kv.lengths, scale=scale, check_pages=False, **plan
        )
    page_size = kv.k_pages.shape[2]
    outs = []
    for b, n in enumerate(kv.lengths.tolist()):  # each sequence over exactly its own n keys
        table, n_pages = kv.block_table[b : b + 1], -(-n // page_size)
        k = kernels.gather_pages(kv.k_pages, table, n_pages)[:, :, :n]  # (1, Hkv, n, D)
        v = kernels.gather_pages(kv.v_pages, table, n_pages)[:, :, :n]
        outs.append(attention(q[b : b + 1], k, v, mask=mask, scale=scale))  # (1, Hq, Tq, D)
    return torch.cat(outs, dim=0)  # (B, Hq, Tq, D)
