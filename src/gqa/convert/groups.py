"""Grouping: which old KV heads are pooled into each new KV head.

A grouping is an explicit list of groups, one per new KV head, each a list of old KV head indices:
``[[0, 1], [2, 3]]`` turns 4 KV heads into 2. Every old head appears exactly once and all groups
have the same size r = Hkv_old // Hkv_new, so the result is a standard checkpoint (one
``num_key_value_heads`` for every head).

Head mapping (the transformers ``repeat_kv`` order): with Hq query heads and Hkv KV heads, query
head h uses KV head h // (Hq // Hkv). In the default :func:`contiguous_groups`, new KV head j pools
old heads j*r .. j*r + r - 1, whose query heads are already the contiguous block
j*(Hq // N) .. (j+1)*(Hq // N) - 1, so no query head moves. Any other grouping is stored by moving
each group's query heads next to each other (:func:`query_order`): the q projection's rows and the
o projection's columns are permuted together, which leaves the attention output unchanged.
"""

from __future__ import annotations

__all__ = ["contiguous_groups", "validate_groups", "query_order", "check_kv_heads"]


def check_kv_heads(n_kv_heads: int, n_heads: int, new_kv_heads: int) -> None:
    """Refuse a target that is not a whole number of old KV groups (one-line ValueError)."""
    if isinstance(new_kv_heads, bool) or not isinstance(new_kv_heads, int):
        raise TypeError(f"kv_heads must be an int, got {type(new_kv_heads).__name__}")
    if new_kv_heads < 1:
        raise ValueError(f"--kv-heads must be >= 1, got {new_kv_heads}")
    if new_kv_heads > n_kv_heads:
        raise ValueError(
            f"--kv-heads {new_kv_heads} exceeds the checkpoint's {n_kv_heads} KV heads; conversion only removes heads"
        )
    if n_kv_heads % new_kv_heads:
        divisors = [d for d in range(1, n_kv_heads + 1) if n_kv_heads % d == 0]
        raise ValueError(
            f"--kv-heads {new_kv_heads} does not divide the checkpoint's {n_kv_heads} KV heads "
            f"({n_heads} query heads); choose one of {divisors}"
        )


def contiguous_groups(n_kv_heads: int, new_kv_heads: int) -> list[list[int]]:
    """The paper's grouping: new KV head j pools old KV heads ``j*r .. j*r + r - 1`` (r = old // new)."""
    check_kv_heads(n_kv_heads, n_kv_heads, new_kv_heads)
    r = n_kv_heads // new_kv_heads
    return [list(range(j * r, (j + 1) * r)) for j in range(new_kv_heads)]


def validate_groups(groups: list[list[int]], n_kv_heads: int) -> list[list[int]]:
    """Check that ``groups`` partitions ``range(n_kv_heads)`` into equal-size groups; return it as lists."""
    groups = [[int(h) for h in g] for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("groups must be a non-empty list of non-empty lists of KV head indices")
    flat = sorted(h for g in groups for h in g)
    if flat != list(range(n_kv_heads)):
        raise ValueError(f"groups must use each of the {n_kv_heads} KV heads exactly once, got {groups}")
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"groups must all have the same size to store a standard checkpoint, got {groups}")
    return groups


def query_order(groups: list[list[int]], n_heads: int, n_kv_heads: int) -> list[int] | None:
    """New query head position -> old query head, or None when no query head moves.

    Old KV head k serves query heads k*g .. k*g + g - 1 (g = n_heads // n_kv_heads). New KV head j
    must serve the contiguous block of query heads j*len(groups[j])*g ..., so its groups' query heads
    are laid out group by group, in the order the group lists its KV heads.
    """
    g = n_heads // n_kv_heads
    order = [k * g + i for group in groups for k in group for i in range(g)]
    return None if order == list(range(n_heads)) else order
