"""The fp64 reference every numeric path is tested against.

Deliberately naive: K/V are repeated to Hq heads (query head h uses KV head h // g), the masked
softmax is written out, and everything runs in float64. Slow and memory-hungry by design; never
used on a hot path.
"""

from __future__ import annotations

import math

import torch

from gqa.errors import GQAUserError
from gqa.kernels.checks import check_scale
from gqa.masks import Mask, as_bool_mask

__all__ = ["reference_attention", "repeat_kv"]


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv*g, T, D] with head h holding KV head h // g (a copy)."""
    return x.repeat_interleave(g, dim=1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
):
    """fp64 attention. q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, Hq, Tq, Dv] float64.

    Causal masks are bottom-right aligned (see :mod:`gqa.masks`); fully masked rows give zeros.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    # Any mix of float dtypes is fine here (everything becomes float64); the rest fails as in gqa.attention.
    if d == 0:
        raise GQAUserError("head_dim is 0; q, k and v need head_dim >= 1")
    if hq == 0 or hkv == 0 or hq % hkv:
        raise GQAUserError(f"Hq={hq} query heads is not a positive multiple of Hkv={hkv} KV heads")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else check_scale(scale)
    q64, k64, v64 = q.double(), repeat_kv(k.double(), g), repeat_kv(v.double(), g)  # (B, Hq, Tk, D)
    scores = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale  # (B, Hq, Tq, Tk)
    m = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # all -inf row -> NaN -> 0
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v64)
    return (out, probs) if return_weights else out
