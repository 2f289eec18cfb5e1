"""Merging: how the KV heads of one group are pooled into one new KV head.

A merge method is a function ``(heads, kind, generator) -> head``: ``heads`` is ``[r, D, ...]``,
the r old heads of one group (rows of a K or V projection weight ``[r, D, d_model]``, of a bias
``[r, D]``, or of a per-head norm scale ``[r, D]``), and the result is ``[D, ...]``. ``kind`` is
``"weight"``, ``"bias"`` or ``"norm"``. Methods are looked up by name in :data:`MERGE_METHODS`, so
a new one is a new entry.

- ``mean``: the GQA paper's recipe (Ainslie et al. 2023, section 2.2): the element-wise mean of
  the group's heads, computed in float64 and rounded once to the output dtype.
- ``first``: keep the group's first head (the paper's weaker baseline).
- ``random``: re-initialize (the paper's weakest baseline): weights from a normal distribution
  with the standard deviation of the group's heads, biases zero; norm scales are mean-pooled since
  they are not part of a projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MERGE_METHODS", "MergeFn", "merge_heads"]

MergeFn = Callable[[torch.Tensor, str, torch.Generator], torch.Tensor]


def _mean(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if heads.shape[0] == 1:
        return heads[0]  # exact: no rounding when a group is one head
    return heads.to(torch.float64).mean(dim=0)


def _first(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    return heads[0]


def _random(heads: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "norm":
        return _mean(heads, kind, generator)
    if kind == "bias":
        return torch.zeros(heads.shape[1:], dtype=torch.float32)
    std = heads.to(torch.float64).std().item() if heads.numel() > 1 else 1.0
    return torch.randn(heads.shape[1:], generator=generator, dtype=torch.float32) * std


MERGE_METHODS: dict[str, MergeFn] = {"mean": _mean, "first": _first, "random": _random}


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
    lists the old heads pooled into new head j. Returns ``[len(groups) * head_dim, ...]`` in
    ``tensor``'s dtype.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if tensor.shape[0] % head_dim:
        raise ValueError(f"dim 0 of size {tensor.shape[0]} is not a whole number of heads of {head_dim}")
    fn = MERGE_METHODS[method]
    generator = generator or torch.Generator().manual_seed(0)
    heads = tensor.reshape(tensor.shape[0] // head_dim, head_dim, *tensor.shape[1:])  # (Hkv, D, ...)
    merged = [fn(heads[group], kind, generator).to(tensor.dtype) for group in groups]  # N x (D, ...)
    return torch.cat(merged, dim=0)  # (N*D, ...)
