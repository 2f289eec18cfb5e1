"""One layer's attention weights split per head, in float64, and written back.

Shapes (D = head_dim, d = model width, augmented inputs carry a trailing bias feature):
    q: [Hq, D, d+1]    k, v: [Hkv, D, d+1]    o: [d, Hq, D]    o_bias: [d] or None
A head's augmented weight is ``[W | b]`` (b = 0 for projections without bias). Query head h reads
KV head h // (Hq // Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.layer import GroupedQueryAttention

__all__ = ["HeadWeights", "split_heads", "build_attention"]


@dataclass
class HeadWeights:
    q: torch.Tensor  # (Hq, D, d+1)
    k: torch.Tensor  # (Hkv, D, d+1)
    v: torch.Tensor  # (Hkv, D, d+1)
    o: torch.Tensor  # (d, Hq, D)
    o_bias: torch.Tensor | None

    @property
    def group_size(self) -> int:
        return self.q.shape[0] // self.k.shape[0]

    def readers(self, kv_head: int) -> range:
        """Query heads that read ``kv_head`` (h // g == kv_head)."""
        g = self.group_size
        return range(kv_head * g, (kv_head + 1) * g)

    def clone(self) -> HeadWeights:
        return HeadWeights(
            self.q.clone(),
            self.k.clone(),
            self.v.clone(),
            self.o.clone(),
            None if self.o_bias is None else self.o_bias.clone(),
        )


def _augmented(linear: torch.nn.Linear, n_heads: int, head_dim: int) -> torch.Tensor:
    w = linear.weight.detach().to(torch.float64)  # (H*D, d)
    b = linear.bias.detach().to(torch.float64) if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w, b[:, None]], dim=1).view(n_heads, head_dim, -1)  # (H, D, d+1)


def split_heads(attn: GroupedQueryAttention) -> HeadWeights:
    """The per-head float64 weights of ``attn``."""
    hq, hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    o = attn.o_proj.weight.detach().to(torch.float64).view(-1, hq, dh)  # (d, Hq, D)
    o_bias = attn.o_proj.bias.detach().to(torch.float64) if attn.o_proj.bias is not None else None
    return HeadWeights(
        _augmented(attn.q_proj, hq, dh), _augmented(attn.k_proj, hkv, dh), _augmented(attn.v_proj, hkv, dh), o, o_bias
    )


def build_attention(template: GroupedQueryAttention, w: HeadWeights) -> GroupedQueryAttention:
    """A new attention module like ``template`` (RoPE, norms, dtype) holding the weights ``w``.

    The number of KV heads is ``w.k.shape[0]``; q/k norms (one [D] scale shared by all heads) are copied.
    """
    dtype, device = template.q_proj.weight.dtype, template.q_proj.weight.device
    hq, dh = template.n_heads, template.head_dim
    hkv = w.k.shape[0]
    attn = GroupedQueryAttention(
        template.d_model,
        hq,
        hkv,
        dh,
        rope_theta=template.rope_theta,
        qkv_bias=template.q_proj.bias is not None,
        o_bias=template.o_proj.bias is not None,
        qk_norm=template.q_norm is not None,
        norm_eps=template.q_norm.eps if template.q_norm is not None else 1e-6,
    ).to(device=device, dtype=dtype)
    with torch.no_grad():
        for lin, heads in ((attn.q_proj, w.q), (attn.k_proj, w.k), (attn.v_proj, w.v)):
            flat = heads.reshape(-1, heads.shape[-1])  # (H*D, d+1)
            lin.weight.copy_(flat[:, :-1])
            if lin.bias is not None:
                lin.bias.copy_(flat[:, -1])
        attn.o_proj.weight.copy_(w.o.reshape(w.o.shape[0], hq * dh))
        if attn.o_proj.bias is not None:
            attn.o_proj.bias.copy_(w.o_bias)
        if template.q_norm is not None:
            attn.q_norm.weight.copy_(template.q_norm.weight)
            attn.k_norm.weight.copy_(template.k_norm.weight)
    if template.rope_theta is not None:
        attn.inv_freq = template.inv_freq.clone()
    return attn
