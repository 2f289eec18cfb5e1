"""Merging: how the KV heads of one group are pooled into one new KV head. One registry, :data:`MERGES`.

Each method declares whether it needs calibration text. Methods that do not (``mean``, ``first``,
``random``) are per-tensor functions ``(heads, kind, generator) -> head`` the streaming converter
applies to every K/V tensor: ``heads`` is ``[r, D, ...]``, the r old heads of one group (rows of a K
or V projection weight ``[r, D, d_model]``, of a bias ``[r, D]``, or of a per-head norm scale
``[r, D]``), the result is ``[D, ...]``, ``kind`` is ``"weight"``, ``"bias"`` or ``"norm"``.
Methods that do (``weighted``, ``lsq``, ``fit``) fit the shared head to calibration statistics and
live in :mod:`gqa.convert.calibrated.fitting`.

- ``mean``: the GQA paper's recipe (Ainslie et al. 2023, section 2.2): the element-wise mean of the
  group's heads, computed in float64 and rounded once (:func:`mean_pool`, the one mean-pool).
- ``first``: keep the group's first head (the paper's weaker baseline).
- ``random``: re-initialize (the paper's weakest baseline): weights from a normal distribution with
  the standard deviation of the group's heads, biases zero; norm scales are mean-pooled since they
  are not part of a projection.
- ``weighted`` / ``lsq``: least-squares shared heads from calibration moments; ``fit``: per layer the
  best measured of mean, weighted and lsq.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError

__all__ = ["MERGES", "MergeMethod", "PoolFn", "merge_method", "mean_pool", "merge_heads"]

PoolFn = Callable[[torch.Tensor, str, torch.Generator], torch.Tensor]


def mean_pool(heads: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean over the r heads along ``dim`` (``[r, ...]`` -> ``[...]`` for dim 0), computed in float64 so
    it is rounded once, to the caller's dtype; a single head comes back unchanged (exact)."""
    if heads.shape[dim] == 1:
        return heads.select(dim, 0)
    return heads.to(torch.float64).mean(dim=dim)


def _mean(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    return mean_pool(heads)


def _first(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    return heads[0]


def _random(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "norm":
        return mean_pool(heads)
    if kind == "bias":
        return torch.zeros(heads.shape[1:], dtype=torch.float32)
    std = heads.to(torch.float64).std().item() if heads.numel() > 1 else 1.0
    return torch.randn(heads.shape[1:], generator=generator, dtype=torch.float32) * std


@dataclass(frozen=True)
class MergeMethod:
    """A merge: its name, whether it needs calibration text, and (for per-tensor methods) the pool."""

    name: str
    needs_calibration: bool
    pool: PoolFn | None  # None: fitted to calibration statistics (gqa.convert.calibrated.fitting)
    help: str


MERGES: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("mean", False, _mean, "element-wise mean (the GQA paper)"),
        MergeMethod("first", False, _first, "keep each group's first head"),
        MergeMethod("random", False, _random, "re-initialize (the paper's weakest baseline)"),
        MergeMethod("weighted", True, None, "least squares on query / output moments"),
        MergeMethod("lsq", True, None, "least squares through RoPE offsets and attention"),
        MergeMethod("fit", True, None, "per layer the best measured of mean, weighted and lsq"),
    )
}


def merge_method(name: str) -> MergeMethod:
    """The registered merge ``name``, or a one-line error listing the choices."""
    if name not in MERGES:
        raise GQAUserError(f"unknown merge method {name!r}; choose one of {', '.join(MERGES)}")
    return MERGES[name]


def merge_heads(
    tensor: torch.Tensor,
    groups: list[list[int]],
    head_dim: int,
    *,
    method: str = "mean",
    kind: str = "weight",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pool the KV heads stacked along dim 0 of ``tensor`` into ``len(groups)`` heads.

    ``tensor``: ``[Hkv * head_dim, ...]`` (a K/V projection weight ``[Hkv*D, d_model]``, bias
    ``[Hkv*D]`` or per-head norm scale); KV head k owns rows ``k*D .. k*D + D - 1``. ``groups[j]``
    lists the old heads pooled into new head j (a single head is copied bit for bit by mean/first,
    which is how expansion replicates). Returns ``[len(groups) * head_dim, ...]`` in ``tensor``'s dtype.
    """
    m = merge_method(method)
    if m.pool is None:
        raise GQAUserError(f"merge {method!r} fits heads to calibration statistics; pass --calib")
    if tensor.shape[0] % head_dim:
        raise GQAUserError(f"dim 0 of size {tensor.shape[0]} is not a whole number of heads of {head_dim}")
    generator = generator or torch.Generator().manual_seed(0)
    heads = tensor.reshape(tensor.shape[0] // head_dim, head_dim, *tensor.shape[1:])  # (Hkv, D, ...)
    r = len(groups[0])
    if m.name in ("mean", "first") and all(len(g) == r for g in groups):
        # All groups at once (a 7B K projection is 64 groups x 128 rows): one gather, one reduction.
        order = [h for g in groups for h in g]
        if order == list(range(heads.shape[0])):
            stacked = heads.view(len(groups), r, *heads.shape[1:])  # (N, r, D, ...): contiguous groups, no copy
        else:
            stacked = heads[order].view(len(groups), r, *heads.shape[1:])  # (N, r, D, ...)
        merged = mean_pool(stacked, dim=1) if m.name == "mean" else stacked[:, 0]  # (N, D, ...)
        return merged.to(tensor.dtype).reshape(len(groups) * head_dim, *tensor.shape[1:])  # (N*D, ...)
    merged = [m.pool(heads[group], kind, generator).to(tensor.dtype) for group in groups]  # N x (D, ...)
    return torch.cat(merged, dim=0)  # (N*D, ...)
