"""``LatentAttention``: attention whose cache is a low-rank latent shared by all heads plus a few rotated
key dims per KV group (MLA-style, as DeepSeek-V2), and :func:`latent_attention`, its absorbed form.

GQA is the special case where the up-projections select heads; a latent of rank R stores R values per
token for every head together, so it reaches KV sizes below one head. Per token and layer the cache
holds ``c = kv_down(x)`` ``[R]`` and, for each of the Hkv KV groups, ``k_rope`` ``[rope_dim]`` with RoPE
applied: ``R + Hkv * rope_dim`` values.

Query head h (of KV group ``h // g``, g = Hq // Hkv) is split as ``[nope (D - rope_dim) | rope
(rope_dim)]``. Its score for key token s is::

    q_nope_h . (W_uk_h c_s)  +  q_rope_h . k_rope_{h // g, s}

and its output ``sum_s p_s W_uv_h c_s``. The rotated dims of each group are frequency pairs of the original
head (``rope_pairs``: pair i rotates dims i and i + rope_dim / 2 at the original head's frequency of pair
``rope_pairs[g, i]``), so a converted layer keeps exactly the positional part it was given.

Two ways to compute the same thing (tests hold them equal against a float64 reference):

* **expanded** (training, prefill): K and V of every head are rebuilt from the latent and standard
  multi-head attention runs over them (:func:`gqa.attention`);
* **absorbed** (decode): ``W_uk`` is folded into the queries (``q_lat_h = W_uk_h^T q_nope_h`` ``[R]``) and
  ``W_uv`` into the output, so a step reads only the cache: R + Hkv * rope_dim values per token. The cache
  holds one row per token, ``[latent | rotated keys of each group]``, and the absorbed attention is
  multi-query attention over those rows (:func:`latent_attention`): gqa's decode kernels run it unchanged.

**QK-norm** (``qk_norm``: Gemma-3, Qwen3). The original normalises each head's query and key (RMS over its D
dims, then a per-dim scale) before RoPE. The query side stays as it was (``q_norm_weight`` ``[Hq, D]``, in
each head's ``[nope | rope]`` order). A key's RMS is a per-token, per-head scalar ``s_{h,s}`` of the whole
pre-norm key ``[W_uk_h c_s ; k_rope_{h // g, s}]``; a scalar commutes with RoPE and with the up-projection, so
it is computed when the token is written and stored in the row (one value per query head), the rotated keys
are stored with the per-dim scale (``k_norm_weight`` ``[Hkv, D]``) applied and the score becomes::

    s_{h,s} * (q_nope_h . (gamma_nope * W_uk_h c_s)  +  q_rope_h . k_rope_{h // g, s})

A row is then ``[latent | rotated keys of each group | s of each query head]``: R + Hkv * rope_dim + Hq
values. The absorbed form scales each head's logits by its s (plain torch: the fused kernels have no
per-key scale), so it still reads only the rows; at full rank the conversion is exact.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from gqa import masks
from gqa.cache.paged import NO_PAGED_QK_NORM, PagedKV
from gqa.errors import GQAUserError
from gqa.functional import attention
from gqa.layer import Linear, RMSNorm, attend
from gqa.rope import apply_rope, rope_frequencies

__all__ = ["LatentAttention", "latent_attention", "ABSORB_MAX_QUERIES"]

_CAUSAL = masks.causal()
#: Queries per call up to which the layer computes in absorbed form by default (decode and short chunks);
#: longer calls rebuild K and V, which costs less when Tq is comparable to Tk.
ABSORB_MAX_QUERIES = 16


def latent_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    rows: torch.Tensor,
    *,
    mask: masks.Mask | torch.Tensor | None = None,
    scale: float,
    key_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed latent attention over cache rows: q_lat ``[B, Hq, Tq, R]``, q_rope ``[B, Hq, Tq, r]`` (query
    head h of group h // g), rows ``[B, Tk, R + Hkv*r]`` = [latent | group 0's rotated keys | group 1's | ...]
    or a paged cache's :class:`gqa.cache.PagedKV` of such rows.
    Returns the attention-weighted latents ``[B, Hq, Tq, R]``.

    This is multi-query attention with the row as the one key and its first R values (the latent, a view:
    nothing is copied) as the value: each query is ``[q_lat | q_rope in its group's slot, zeros elsewhere]``,
    so its score is ``q_lat . c + q_rope . k_rope_group``, and its output the weighted latents. It therefore
    runs on :func:`gqa.attention`'s kernels as they are (the fused CPU decode kernel, Triton, SDPA; values
    narrower than keys), reading each cache row once: R + Hkv*r values per token.

    ``key_scales`` ``[B, Hq, Tk]`` (QK-norm layers, see the module doc; rows then hold only the latent and the
    rotated keys): head h's logit for key s is multiplied by ``key_scales[:, h, s]``, in plain torch ops.
    """
    b, hq, tq, rank = q_lat.shape
    paged = isinstance(rows, PagedKV)
    width = rows.k_pages.shape[-1] if paged else rows.shape[-1]
    hkv = (width - rank) // q_rope.shape[-1] if q_rope.shape[-1] else 1
    g = hq // hkv
    q = q_lat
    if q_rope.shape[-1]:
        eye = torch.eye(hkv, dtype=q_rope.dtype, device=q_rope.device)
        slots = torch.einsum("bjgtr,jk->bjgtkr", q_rope.reshape(b, hkv, g, tq, -1), eye)  # zeros off the group's slot
        q = torch.cat([q_lat, slots.reshape(b, hq, tq, width - rank)], dim=-1)  # (B, Hq, Tq, R + Hkv*r)
    if key_scales is not None:
        return _scaled_latent_attention(q, rows, key_scales, rank, mask, scale)
    if paged:  # pages [num_pages, 1, P, W]: the same one KV head, read in place; values = the latent columns
        return attend(q, dataclasses.replace(rows, v_pages=rows.k_pages[..., :rank]), mask, scale=scale)
    k = rows[:, None]  # (B, 1, Tk, W): one KV head, the row as its key
    return attention(q, k, k[..., :rank], mask=mask, scale=scale)  # (B, Hq, Tq, R)


def _scaled_latent_attention(q, rows, key_scales, rank, mask, scale) -> torch.Tensor:
    """Softmax over ``scale * key_scales * (q . rows)`` per head (q ``[B, Hq, Tq, W]``, rows ``[B, Tk, W]``,
    key_scales ``[B, Hq, Tk]``), weighting the latents ``rows[..., :R]``: ``[B, Hq, Tq, R]``. Computed in at
    least fp32; queries that see no key return zeros, as :func:`gqa.attention`."""
    if isinstance(rows, PagedKV):
        raise GQAUserError(NO_PAGED_QK_NORM)
    b, hq, tq, _ = q.shape
    tk = rows.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhqw,bkw->bhqk", q.to(work), rows.to(work)) * (scale * key_scales.to(work)[:, :, None, :])
    allowed = masks.as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, Hq, Tq, Tk); rows with no key: 0
    return torch.einsum("bhqk,bkr->bhqr", p, rows[..., :rank].to(work)).to(q.dtype)


def _head_rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / RMS`` over the last dim, in at least fp32: x ``[..., D]`` -> ``[...]``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


class LatentAttention(nn.Module):
    """Self-attention over a low-rank latent KV cache (see the module doc for the maths and shapes).

    Args:
        d_model: model width.
        n_heads: query heads Hq.
        n_kv_heads: KV groups Hkv (a divisor of Hq); each keeps its own ``rope_dim`` rotated key dims.
        head_dim: per-head width D of queries, keys and values.
        rank: latent width R, shared by all heads.
        rope_dim: rotated key dims per group (even, 0..D); the other D - rope_dim query dims read the latent.
        rope_theta: the RoPE base whose frequencies ``rope_pairs`` index (pairs of a D-dim head).
        qkv_bias: biases on the query, latent and rotated-key projections.
        o_bias: bias on the output projection.
        latent_norm: an RMSNorm over the latent before the up-projections (DeepSeek-V2 has one).
        latent_norm_eps: its epsilon (default ``norm_eps``).
        qk_norm: the original's per-head query and key RMSNorm (Gemma-3, Qwen3; see the module doc).
        norm_scale_fp32: those norms scale in fp32 before casting back (Gemma, see :class:`gqa.layer.RMSNorm`).
        scale: softmax scale (default D ** -0.5).

    Parameters: ``q_proj`` [Hq*D, d] (each head ``[nope | rope]``), ``kv_down`` [R, d], ``k_rope_proj``
    [Hkv*rope_dim, d], ``k_up`` [Hq*(D-rope_dim), R], ``v_up`` [Hq*D, R], ``o_proj`` [d, Hq*D]; buffer
    ``rope_pairs`` (long ``[Hkv, rope_dim/2]``, saved with the weights); with ``qk_norm`` also
    ``q_norm_weight`` [Hq, D] and ``k_norm_weight`` [Hkv, D], each head's in its ``[nope | rope]`` order.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rank: int,
        rope_dim: int,
        *,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
        o_bias: bool = False,
        latent_norm: bool = False,
        latent_norm_eps: float | None = None,
        qk_norm: bool = False,
        norm_scale_fp32: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
    ):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise GQAUserError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; use a divisor of {n_heads}"
            )
        if rope_dim % 2 or not 0 <= rope_dim <= head_dim:
            raise GQAUserError(f"rope_dim={rope_dim} must be even and between 0 and head_dim={head_dim}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.rank, self.rope_dim, self.nope_dim = rank, rope_dim, head_dim - rope_dim
        with warnings.catch_warnings():  # rope_dim 0 or head_dim: an empty projection, nothing to initialise
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.q_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
            self.kv_down = Linear(d_model, rank, bias=qkv_bias)
            self.k_rope_proj = Linear(d_model, n_kv_heads * rope_dim, bias=qkv_bias)
            self.k_up = Linear(rank, n_heads * self.nope_dim, bias=False)
            self.v_up = Linear(rank, n_heads * head_dim, bias=False)
            self.o_proj = Linear(n_heads * head_dim, d_model, bias=o_bias)
        eps = norm_eps if latent_norm_eps is None else latent_norm_eps
        self.latent_norm = RMSNorm(rank, eps) if latent_norm else None
        self.qk_norm, self.norm_eps, self.norm_scale_fp32 = qk_norm, norm_eps, norm_scale_fp32
        self.q_norm_weight = nn.Parameter(torch.ones(n_heads, head_dim)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(n_kv_heads, head_dim)) if qk_norm else None
        self.scale = head_dim**-0.5 if scale is None else scale
        self.rope_theta = rope_theta
        # Default: every group keeps the rope_dim / 2 highest frequencies; a conversion sets its own.
        pairs = torch.arange(rope_dim // 2).expand(n_kv_heads, -1).contiguous()
        self.register_buffer("rope_pairs", pairs, persistent=True)
        self.register_buffer("head_freq", rope_frequencies(head_dim, rope_theta), persistent=False)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_values_per_token(self) -> int:
        """Cache values one token takes in this layer: R + Hkv * rope_dim (+ Hq key scales with QK-norm)."""
        return self.rank + self.n_kv_heads * self.rope_dim + (self.n_heads if self.qk_norm else 0)

    def _scaled(self, x: torch.Tensor, s: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """``x * s * weight`` as :class:`gqa.layer.RMSNorm` rounds it: x ``[B, H, T, n]``, s ``[B, H, T]``
        (fp32; None: 1), weight ``[H, n]``."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32)) if s is None else x.to(s.dtype) * s[..., None]
        if self.norm_scale_fp32:
            return (xf * weight[:, None].to(xf.dtype)).to(x.dtype)
        return weight[:, None] * xf.to(x.dtype)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` or ``[B, T]`` -> cos, sin ``[Hkv, T, r]`` or ``[B, Hkv, T, r]`` (fp32), each group at
        its own frequencies (the two halves repeat, as :func:`gqa.rope.rope_cos_sin`)."""
        freq = self.head_freq.float()[self.rope_pairs]  # (Hkv, r/2)
        angles = positions.to(torch.float32)[..., None, :, None] * freq[:, None, :]  # (.., Hkv, T, r/2)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x ``[B, T, d]`` -> q_nope ``[B, Hq, T, D-r]``, q_rope ``[B, Hq, T, r]`` (rotated) and the cache rows of
        the T tokens ``[B, T, R + Hkv*r]``: the latent (normed, with ``latent_norm``) and each group's rotated keys
        (with ``qk_norm``: normed queries, and rows ``[B, T, R + Hkv*r + Hq]`` ending in the key scales)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        if self.qk_norm:
            q = self._scaled(q, _head_rms_scale(q, self.norm_eps), self.q_norm_weight)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]
        latent = self.kv_down(x)  # (B, T, R)
        if self.latent_norm is not None:
            latent = self.latent_norm(latent)
        k_rope = self.k_rope_proj(x).view(b, t, self.n_kv_heads, self.rope_dim).transpose(1, 2)  # (B, Hkv, T, r)
        scales = None
        if self.qk_norm:
            scales = self._key_scales(latent, k_rope)  # (B, Hq, T) fp32, computed before k_rope is scaled
            k_rope = self._scaled(k_rope, None, self.k_norm_weight[:, self.nope_dim :])
        if self.rope_dim:
            cos, sin = self.rope_tables(positions)
            if cos.dim() == 3:
                cos, sin = cos[None], sin[None]  # (1, Hkv, T, r)
            k_rope = apply_rope(k_rope, cos, sin)
            g = self.group_size
            q_rope = apply_rope(q_rope, cos.repeat_interleave(g, dim=1), sin.repeat_interleave(g, dim=1))
        parts = [latent, k_rope.transpose(1, 2).reshape(b, t, -1)]
        if scales is not None:
            parts.append(scales.transpose(1, 2).to(latent.dtype))
        rows = torch.cat(parts, dim=-1)  # (B, T, R + Hkv*r [+ Hq])
        return q_nope, q_rope, rows

    def _key_scales(self, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """1 / RMS of every head's whole pre-norm key ``[W_uk_h c ; k_rope_group]``: latent ``[B, T, R]``,
        k_rope (not yet normed or rotated) ``[B, Hkv, T, r]`` -> ``[B, Hq, T]`` fp32."""
        b, t, _ = latent.shape
        k_nope = self.k_up(latent).view(b, t, self.n_heads, self.nope_dim).transpose(1, 2)  # (B, Hq, T, D-r)
        work = torch.promote_types(latent.dtype, torch.float32)
        sq = k_nope.to(work).pow(2).sum(-1) + k_rope.to(work).pow(2).sum(-1).repeat_interleave(self.group_size, dim=1)
        return torch.rsqrt(sq / self.head_dim + self.norm_eps)

    def _split_rows(self, rows: torch.Tensor):
        """Cache rows ``[B, Tk, W]`` -> their key part ``[B, Tk, R + Hkv*r]`` and key scales ``[B, Hq, Tk]``
        (None without QK-norm)."""
        if not self.qk_norm:
            return rows, None
        width = self.rank + self.n_kv_heads * self.rope_dim
        return rows[..., :width], rows[..., width:].transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        mask: masks.Mask | torch.Tensor | None = _CAUSAL,
        rope=None,
        *,
        form: str = "auto",
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; arguments as :meth:`gqa.GroupedQueryAttention.forward`
        (``rope`` is ignored: each group has its own frequencies). cache: a
        :class:`gqa.cache.LatentKVCache`. form: ``"absorbed"``, ``"expanded"`` or ``"auto"`` (absorbed up
        to :data:`ABSORB_MAX_QUERIES` queries)."""
        if form not in ("auto", "absorbed", "expanded"):
            raise GQAUserError(f"form must be 'auto', 'absorbed' or 'expanded', got {form!r}")
        b, t, _ = x.shape
        if positions is None:
            positions = cache.positions(t, x.device) if cache is not None else torch.arange(t, device=x.device)
        q_nope, q_rope, rows = self.project(x, positions)
        if cache is not None:
            if not hasattr(cache, "update_rows"):
                raise GQAUserError(
                    f"a latent layer needs a LatentKVCache (model.make_cache) or a PagedKVCache.for_model pool, got "
                    f"{type(cache).__name__}; dynamic grouping does not take latent models"
                )
            rows = cache.update_rows(rows)  # (B, Tk, R + Hkv*r), or the paged pool's PagedKV
        paged = not isinstance(rows, torch.Tensor)
        if t == 1 and isinstance(mask, masks.Causal):
            mask = None  # one query at the last position sees every key: the unmasked (fused) kernels
        if form == "absorbed" or paged or (form == "auto" and t <= ABSORB_MAX_QUERIES):  # pages: read in place
            out = self._absorbed(q_nope, q_rope, rows, mask)
        else:
            out = self._expanded(q_nope, q_rope, rows, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _absorbed(self, q_nope, q_rope, rows, mask) -> torch.Tensor:
        """Heads' outputs ``[B, Hq, T, D]`` reading only the cache rows (W_uk into the queries, W_uv after)."""
        h, n, r, d = self.n_heads, self.nope_dim, self.rank, self.head_dim
        if self.qk_norm:  # the key norm's per-dim scale moves onto the queries' nope dims
            gamma = self.k_norm_weight[:, :n].repeat_interleave(self.group_size, dim=0)  # (Hq, D-r)
            q_nope = q_nope * gamma[:, None].to(q_nope.dtype)
        if isinstance(rows, PagedKV) and self.qk_norm:
            raise GQAUserError(NO_PAGED_QK_NORM)
        keys, scales = self._split_rows(rows)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, self.k_up.weight.view(h, n, r))  # (B, Hq, T, R)
        o_lat = latent_attention(q_lat, q_rope, keys, mask=mask, scale=self.scale, key_scales=scales)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, self.v_up.weight.view(h, d, r))  # (B, Hq, T, D)

    def _expanded(self, q_nope, q_rope, rows, mask) -> torch.Tensor:
        """Heads' outputs ``[B, Hq, T, D]`` with every head's K and V rebuilt from the latent."""
        b, tk = rows.shape[:2]
        rows, scales = self._split_rows(rows)
        c = rows[..., : self.rank]
        k_rope = rows[..., self.rank :].view(b, tk, self.n_kv_heads, self.rope_dim).transpose(1, 2)  # (B, Hkv, Tk, r)
        k_nope = self.k_up(c).view(b, tk, self.n_heads, self.nope_dim).transpose(1, 2)  # (B, Hq, Tk, D-r)
        v = self.v_up(c).view(b, tk, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Tk, D)
        k = torch.cat([k_nope, k_rope.repeat_interleave(self.group_size, dim=1)], dim=-1)  # (B, Hq, Tk, D)
        if scales is not None:  # the key norm: each head's RMS scale, the per-dim scale on the nope dims
            gamma = self.k_norm_weight.repeat_interleave(self.group_size, dim=0)  # (Hq, D)
            gamma = torch.cat([gamma[:, : self.nope_dim], torch.ones_like(gamma[:, self.nope_dim :])], dim=-1)
            k = self._scaled(k, scales.to(torch.promote_types(scales.dtype, torch.float32)), gamma)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attention(q, k, v, mask=mask, scale=self.scale)
