"""Merging a group of (aligned) KV heads into one shared head.

Every method returns the shared head's augmented K and V weights ``[D, d+1]`` from the group's
aligned heads (see :mod:`gqa.grouping.align`). With S_a the second moment of the queries that read
old head a and G_a the Gram matrix of the output-projection columns that read it:

- ``mean``: the element-wise mean (the GQA paper's pooling, after alignment).
- ``weighted``: K = (sum S_a)^-1 sum S_a K_a, V = (sum G_a)^-1 sum G_a V_a: the shared head that
  minimises the logit error sum_a E[(q^T (k_a - k))^2] and the output error sum_a E||O_a (v_a - v)||^2
  when queries and inputs are uncorrelated (pre-RoPE moments at zero offset).
- ``lsq``: the same least squares with what attention actually does: S_a is the query moment
  rotated by RoPE over the offsets each head attends to (weighted by its measured offset
  distribution), and V is fitted to attention-averaged inputs (sum_a G_a V C̄_a = sum_a G_a V_a C̄_a,
  solved by conjugate gradients). Needs attention statistics; otherwise it equals ``weighted``.

``merge="fit"`` in :func:`gqa.grouping.reduce_kv_heads` measures mean, weighted and lsq on the
calibration samples and keeps, per layer, whichever gives the smallest layer-output error, so it is
never worse than the mean on the calibration data.
"""

from __future__ import annotations

import torch

from gqa.grouping.align import rotation_matrix
from gqa.grouping.heads import HeadWeights
from gqa.grouping.stats import LayerStats

__all__ = ["MERGE_CHOICES", "merge_group", "query_moment"]

MERGE_CHOICES = ("mean", "weighted", "lsq")


def _ridge(m: torch.Tensor, rel: float = 1e-8) -> torch.Tensor:
    """m + a tiny multiple of its mean diagonal: keeps solves finite for rank-deficient moments."""
    scale = torch.diagonal(m).mean().clamp_min(1e-300)
    return m + rel * scale * torch.eye(m.shape[0], dtype=m.dtype)


def query_moment(
    w: HeadWeights, h: int, moment: torch.Tensor, offsets: torch.Tensor | None, inv_freq: torch.Tensor | None
) -> torch.Tensor:
    """E[r r^T] [D, D] for query head h: r = q (``offsets`` None) or r = R(theta * (p - s)) q averaged
    over the head's attention offset distribution ``offsets`` [T] (RoPE rotates q relative to k)."""
    qm = w.q[h] @ moment @ w.q[h].T  # (D, D) pre-RoPE E[q q^T]
    if offsets is None or inv_freq is None:
        return qm
    keep = offsets > 1e-6 * offsets.max()  # offsets with attention mass; the rest add nothing visible
    delta = torch.nonzero(keep).flatten()
    rot = torch.stack([rotation_matrix(float(t) * inv_freq.double()) for t in delta])  # (n, D, D)
    return torch.einsum("n,nij,jk,nlk->il", offsets[delta].double(), rot, qm, rot)


def _weighted_mean(weights: list[torch.Tensor], heads: list[torch.Tensor]) -> torch.Tensor:
    total = _ridge(sum(weights))
    return torch.linalg.solve(total, sum(m @ x for m, x in zip(weights, heads, strict=True)))


def _sylvester_cg(
    left: list[torch.Tensor], right: list[torch.Tensor], heads: list[torch.Tensor], start: torch.Tensor
) -> torch.Tensor:
    """Solve sum_a L_a X R_a = sum_a L_a H_a R_a for X [D, d+1] by conjugate gradients (L_a, R_a PSD)."""
    scale = sum(torch.diagonal(l_).mean() * torch.diagonal(r_).mean() for l_, r_ in zip(left, right, strict=True))
    lam = 1e-8 * float(scale)

    def op(x):
        return sum(l_ @ x @ r_ for l_, r_ in zip(left, right, strict=True)) + lam * x

    b = sum(l_ @ h_ @ r_ for l_, r_, h_ in zip(left, right, heads, strict=True))
    x = start.clone()
    r = b - op(x)
    p = r.clone()
    rs = (r * r).sum()
    b_norm = (b * b).sum().sqrt().clamp_min(1e-300)
    for _ in range(300):
        if rs.sqrt() <= 1e-10 * b_norm:
            break
        ap = op(p)
        alpha = rs / (p * ap).sum()
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def merge_group(
    w: HeadWeights,
    group: list[int],
    method: str,
    stats: LayerStats | None,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared K and V ``[D, d+1]`` for ``group`` (old KV heads of aligned weights ``w``)."""
    ks, vs = [w.k[a] for a in group], [w.v[a] for a in group]
    if len(group) == 1:
        return ks[0].clone(), vs[0].clone()
    if method == "mean":
        return torch.stack(ks).mean(0), torch.stack(vs).mean(0)
    if method not in MERGE_CHOICES:
        raise ValueError(f"unknown merge {method!r}; choose one of {', '.join(MERGE_CHOICES)}")
    if stats is None:
        raise ValueError(f"merge {method!r} needs calibration statistics; pass --calib")
    c = stats.input_moment
    use_attention = method == "lsq" and stats.offset_weights is not None
    s_k, g_v = [], []
    for a in group:
        readers = list(w.readers(a))
        s_k.append(
            sum(query_moment(w, h, c, stats.offset_weights[h] if use_attention else None, inv_freq) for h in readers)
        )
        g_v.append(sum(w.o[:, h].T @ w.o[:, h] for h in readers))  # (D, D)
    k = _weighted_mean(s_k, ks)
    v = _weighted_mean(g_v, vs)
    if use_attention and stats.attended_moment is not None:
        v = _sylvester_cg(g_v, [stats.attended_moment[a] for a in group], vs, v)
    return k, v
