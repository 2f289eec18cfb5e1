"""Balanced grouping: split heads into equal-size groups with the least within-group distance.

The objective is the sum, over groups, of the pairwise distances inside each group (for groups of
two, a minimum-weight perfect matching). Up to :data:`EXACT_MAX_HEADS` heads it is solved exactly
by dynamic programming over subsets (the lowest unassigned head always opens the next group, so
each partition is visited once); beyond that, a contiguous start is improved by pairwise swaps
between groups until no swap lowers the cost (a local optimum, stated in the report).
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

from gqa.errors import GQAUserError

__all__ = ["balanced_groups", "grouping_cost", "EXACT_MAX_HEADS"]

EXACT_MAX_HEADS = 16


def grouping_cost(dist: torch.Tensor, groups: list[list[int]]) -> float:
    """Sum of pairwise distances inside each group."""
    return float(sum(dist[a, b] for g in groups for a, b in itertools.combinations(g, 2)))


def balanced_groups(dist: torch.Tensor, n_groups: int) -> list[list[int]]:
    """Partition heads ``0..n-1`` into ``n_groups`` groups of n / n_groups heads minimising
    :func:`grouping_cost` for the symmetric distance matrix ``dist`` [n, n].

    Groups come back sorted by their smallest head, each sorted ascending.
    """
    n = dist.shape[0]
    if n_groups < 1 or n % n_groups:
        raise GQAUserError(f"{n_groups} groups do not split {n} heads evenly; choose a divisor of {n}")
    size = n // n_groups
    if size == 1:
        return [[a] for a in range(n)]
    if n_groups == 1:
        return [list(range(n))]
    d = dist.double().tolist()
    if n <= EXACT_MAX_HEADS:
        return _exact(d, n, size)
    return _local_search(d, n, size)


def _exact(d: list[list[float]], n: int, size: int) -> list[list[int]]:
    full = (1 << n) - 1

    @cache
    def best(used: int) -> tuple[float, tuple[tuple[int, ...], ...]]:
        if used == full:
            return 0.0, ()
        first = next(i for i in range(n) if not used >> i & 1)
        free = [i for i in range(first + 1, n) if not used >> i & 1]
        top = (float("inf"), ())
        for rest in itertools.combinations(free, size - 1):
            group = (first, *rest)
            cost = sum(d[a][b] for a, b in itertools.combinations(group, 2))
            mask = used | sum(1 << i for i in group)
            sub_cost, sub_groups = best(mask)
            if cost + sub_cost < top[0]:
                top = (cost + sub_cost, (group, *sub_groups))
        return top

    return [list(g) for g in best(0)[1]]


def _local_search(d: list[list[float]], n: int, size: int) -> list[list[int]]:
    groups = [list(range(j * size, (j + 1) * size)) for j in range(n // size)]

    def member_cost(a: int, group: list[int], skip: int) -> float:
        return sum(d[a][b] for b in group if b != skip and b != a)

    improved = True
    while improved:
        improved = False
        for gi, gj in itertools.combinations(range(len(groups)), 2):
            for a in list(groups[gi]):
                for b in list(groups[gj]):
                    before = member_cost(a, groups[gi], a) + member_cost(b, groups[gj], b)
                    after = member_cost(b, groups[gi], a) + member_cost(a, groups[gj], b)
                    if after < before - 1e-12:
                        groups[gi][groups[gi].index(a)] = b
                        groups[gj][groups[gj].index(b)] = a
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
    return sorted(sorted(g) for g in groups)
