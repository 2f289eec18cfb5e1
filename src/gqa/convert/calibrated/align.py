"""Head alignment: change a KV head's basis, with the heads that read it compensating exactly.

- K: a 2x2 rotation per RoPE frequency pair (dims i and i + D/2 in the rotate-half layout). Such a
  rotation commutes with RoPE (the same plane, both rotations), so rotating a K head and the query
  heads that read it by the same R leaves every logit q^T k unchanged at every position pair.
  (A general orthogonal map would not commute with RoPE; with per-head q/k norms, whose [D] scale
  does not commute with a rotation, K is left unaligned.)
- V: any orthogonal U (orthogonal Procrustes); the output projection columns of the query heads
  that read the V head take U^T, so o_proj(v) is unchanged.

Each transform is chosen from calibration moments (C = E[x~ x~^T]): the cross moment of head b
with a target t is M = W_t C W_b^T, and the best map maximises tr(T^T M).
"""

from __future__ import annotations

import torch

from gqa.convert.calibrated.heads import HeadWeights

__all__ = [
    "pair_rotation",
    "rotation_matrix",
    "procrustes",
    "apply_transforms",
    "align_groups",
    "aligned_distance",
]


def _pair_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """m [D, D] -> the 2x2 blocks (m00, m01, m10, m11) [D/2] of every frequency pair (i, i + D/2)."""
    h = m.shape[-1] // 2
    i = torch.arange(h)
    return m[..., i, i], m[..., i, i + h], m[..., i + h, i], m[..., i + h, i + h]


def pair_rotation(cross: torch.Tensor) -> torch.Tensor:
    """Angles [D/2] of the per-pair rotations R maximising tr(R^T M) for ``cross`` M = E[t k^T] [D, D]."""
    m00, m01, m10, m11 = _pair_blocks(cross)
    return torch.atan2(m10 - m01, m00 + m11)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Per-pair angles [D/2] -> the [D, D] block rotation in the rotate-half layout."""
    h = angles.shape[0]
    c, s = angles.cos(), angles.sin()
    r = torch.zeros(2 * h, 2 * h, dtype=angles.dtype)
    i = torch.arange(h)
    r[i, i], r[i, i + h], r[i + h, i], r[i + h, i + h] = c, -s, s, c
    return r


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal U [D, D] maximising tr(U^T M) for ``cross`` M [D, D] (U = P Q^T from M = P S Q^T)."""
    p, _, qh = torch.linalg.svd(cross)
    return p @ qh


def apply_transforms(w: HeadWeights, k_maps: list[torch.Tensor], v_maps: list[torch.Tensor]) -> HeadWeights:
    """Fold per-KV-head maps into the weights: k_a <- R_a k_a with its readers' q_h <- R_a q_h;
    v_a <- U_a v_a with its readers' o_h <- o_h U_a^T. Exact for orthogonal R_a commuting with RoPE."""
    out = w.clone()
    for a, (r, u) in enumerate(zip(k_maps, v_maps, strict=True)):
        out.k[a] = r @ w.k[a]  # (D, d+1)
        out.v[a] = u @ w.v[a]
        for h in w.readers(a):
            out.q[h] = r @ w.q[h]
            out.o[:, h] = w.o[:, h] @ u.T  # (d, D)
    return out


def align_groups(
    w: HeadWeights,
    groups: list[list[int]],
    moment: torch.Tensor,
    *,
    align_k: bool = True,
    iterations: int = 4,
) -> tuple[HeadWeights, list[torch.Tensor], list[torch.Tensor]]:
    """Align every group's heads to their common mean (generalised Procrustes).

    Starts from the group's first head as the target, then alternates: fit each head's map to the
    mean of the aligned heads, recompute the mean. Returns the aligned weights and the per-head K
    and V maps ([D, D] each, indexed by old KV head).
    """
    d_head = w.k.shape[1]
    eye = torch.eye(d_head, dtype=torch.float64)
    k_maps = [eye.clone() for _ in range(w.k.shape[0])]
    v_maps = [eye.clone() for _ in range(w.k.shape[0])]
    for group in groups:
        if len(group) == 1:
            continue
        target_k, target_v = w.k[group[0]], w.v[group[0]]  # (D, d+1)
        for _ in range(iterations):
            for a in group:
                if align_k:
                    angles = pair_rotation(target_k @ moment @ w.k[a].T)
                    k_maps[a] = rotation_matrix(angles)
                v_maps[a] = procrustes(target_v @ moment @ w.v[a].T)
            target_k = torch.stack([k_maps[a] @ w.k[a] for a in group]).mean(0)
            target_v = torch.stack([v_maps[a] @ w.v[a] for a in group]).mean(0)
    return apply_transforms(w, k_maps, v_maps), k_maps, v_maps


def aligned_distance(w: HeadWeights, moment: torch.Tensor, *, align_k: bool = True) -> torch.Tensor:
    """Pairwise head distance [Hkv, Hkv] after the best alignment of one head onto the other.

    For heads a, b: E||k_a - R k_b||^2 / (E||k_a||^2 + E||k_b||^2) plus the same for V with the
    best orthogonal U; 0 means b can stand in for a exactly, 2 is the maximum.
    """
    n = w.k.shape[0]
    kk = torch.einsum("aij,jl,bml->abim", w.k, moment, w.k)  # (Hkv, Hkv, D, D) cross moments
    vv = torch.einsum("aij,jl,bml->abim", w.v, moment, w.v)
    k_energy = torch.diagonal(kk, dim1=-2, dim2=-1).sum(-1).diagonal()  # (Hkv,) E||k_a||^2
    v_energy = torch.diagonal(vv, dim1=-2, dim2=-1).sum(-1).diagonal()
    if align_k:
        m00, m01, m10, m11 = _pair_blocks(kk)
        k_best = torch.sqrt((m00 + m11) ** 2 + (m10 - m01) ** 2).sum(-1)  # (Hkv, Hkv) max tr(R^T M)
    else:
        k_best = torch.diagonal(kk, dim1=-2, dim2=-1).sum(-1)
    v_best = torch.linalg.matrix_norm(vv, ord="nuc")  # max over orthogonal U of tr(U^T M)
    k_sum = k_energy[:, None] + k_energy[None, :]
    v_sum = v_energy[:, None] + v_energy[None, :]
    dist = (k_sum - 2 * k_best) / k_sum.clamp_min(1e-300) + (v_sum - 2 * v_best) / v_sum.clamp_min(1e-300)
    dist = dist.clamp_min(0)
    dist.fill_diagonal_(0)
    return (dist + dist.T) / 2 if n > 1 else dist
