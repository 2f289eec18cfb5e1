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
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from gqa import masks
from gqa.cache.paged import PagedKV
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
    if paged:  # pages [num_pages, 1, P, W]: the same one KV head, read in place; values = the latent columns
        return attend(q, dataclasses.replace(rows, v_pages=rows.k_pages[..., :rank]), mask, scale=scale)
    k = rows[:, None]  # (B, 1, Tk, W): one KV head, the row as its key
    return attention(q, k, k[..., :rank], mask=mask, scale=scale)  # (B, Hq, Tq, R)


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
        scale: softmax scale (default D ** -0.5).

    Parameters: ``q_proj`` [Hq*D, d] (each head ``[nope | rope]``), ``kv_down`` [R, d], ``k_rope_proj``
    [Hkv*rope_dim, d], ``k_up`` [Hq*(D-rope_dim), R], ``v_up`` [Hq*D, R], ``o_proj`` [d, Hq*D]; buffer
    ``rope_pairs`` (long ``[Hkv, rope_dim/2]``, saved with the weights).
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
        self.latent_norm = RMSNorm(rank, norm_eps) if latent_norm else None
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
        """Cache values one token takes in this layer: R + Hkv * rope_dim."""
        return self.rank + self.n_kv_heads * self.rope_dim

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` or ``[B, T]`` -> cos, sin ``[Hkv, T, r]`` or ``[B, Hkv, T, r]`` (fp32), each group at
        its own frequencies (the two halves repeat, as :func:`gqa.rope.rope_cos_sin`)."""
        freq = self.head_freq.float()[self.rope_pairs]  # (Hkv, r/2)
        angles = positions.to(torch.float32)[..., None, :, None] * freq[:, None, :]  # (.., Hkv, T, r/2)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x ``[B, T, d]`` -> q_nope ``[B, Hq, T, D-r]``, q_rope ``[B, Hq, T, r]`` (rotated) and the cache rows of
        the T tokens ``[B, T, R + Hkv*r]``: the latent (normed, with ``latent_norm``) and each group's rotated keys."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]
        latent = self.kv_down(x)  # (B, T, R)
        if self.latent_norm is not None:
            latent = self.latent_norm(latent)
        k_rope = self.k_rope_proj(x).view(b, t, self.n_kv_heads, self.rope_dim).transpose(1, 2)  # (B, Hkv, T, r)
        if self.rope_dim:
            cos, sin = self.rope_tables(positions)
            if cos.dim() == 3:
                cos, sin = cos[None], sin[None]  # (1, Hkv, T, r)
            k_rope = apply_rope(k_rope, cos, sin)
            g = self.group_size
            q_rope = apply_rope(q_rope, cos.repeat_interleave(g, dim=1), sin.repeat_interleave(g, dim=1))
        rows = torch.cat([latent, k_rope.transpose(1, 2).reshape(b, t, -1)], dim=-1)  # (B, T, R + Hkv*r)
        return q_nope, q_rope, rows

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
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, self.k_up.weight.view(h, n, r))  # (B, Hq, T, R)
        o_lat = latent_attention(q_lat, q_rope, rows, mask=mask, scale=self.scale)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, self.v_up.weight.view(h, d, r))  # (B, Hq, T, D)

    def _expanded(self, q_nope, q_rope, rows, mask) -> torch.Tensor:
        """Heads' outputs ``[B, Hq, T, D]`` with every head's K and V rebuilt from the latent."""
        b, tk = rows.shape[:2]
        c = rows[..., : self.rank]
        k_rope = rows[..., self.rank :].view(b, tk, self.n_kv_heads, self.rope_dim).transpose(1, 2)  # (B, Hkv, Tk, r)
        k_nope = self.k_up(c).view(b, tk, self.n_heads, self.nope_dim).transpose(1, 2)  # (B, Hq, Tk, D-r)
        v = self.v_up(c).view(b, tk, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Tk, D)
        k = torch.cat([k_nope, k_rope.repeat_interleave(self.group_size, dim=1)], dim=-1)  # (B, Hq, Tk, D)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attention(q, k, v, mask=mask, scale=self.scale)
