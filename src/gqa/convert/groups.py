"""Groups: which old KV heads make up each new KV head (the one group type of the converter).

A layer's grouping is a list with one entry per new KV head, each a list of old KV head indices:

- reduction (N < Hkv): ``[[0, 1], [2, 3]]`` turns 4 KV heads into 2. Every old head appears exactly
  once and all groups have the same size r = Hkv // N, so the result is a standard checkpoint.
- expansion (N > Hkv, N a multiple of Hkv dividing Hq): ``[[0], [0], [1], [1]]`` turns 2 KV heads
  into 4 by replicating: new head j is old head j // r (r = N // Hkv). Exact: query head h reads new
  head h // (Hq // N), which is a copy of old head h // (Hq // Hkv).

Head mapping (the transformers ``repeat_kv`` order): with Hq query heads and Hkv KV heads, query
head h uses KV head h // (Hq // Hkv). In :func:`contiguous_groups`, new KV head j pools old heads
j*r .. j*r + r - 1, whose query heads are already the contiguous block j*(Hq // N) .. (j+1)*(Hq // N) - 1,
so no query head moves. Any other grouping is stored by moving each group's query heads next to each
other (:func:`query_order`): the q projection's rows and the o projection's columns are permuted
together, which leaves the attention output unchanged.
"""

from __future__ import annotations

from gqa.errors import GQAUserError

__all__ = [
    "Groups",
    "contiguous_groups",
    "expansion_groups",
    "groups_for",
    "validate_groups",
    "query_order",
    "check_kv_heads",
    "kv_head_options",
]

#: One layer's grouping: ``groups[j]`` lists the old KV heads that form new KV head j.
Groups = list[list[int]]


def kv_head_options(n_kv_heads: int, n_heads: int | None = None) -> list[int]:
    """KV-head counts a layer with ``n_kv_heads`` (and ``n_heads`` query heads) can be converted to:
    the divisors of Hkv (merging equal groups) and, given ``n_heads``, the multiples of Hkv that
    divide Hq (replicating heads)."""
    opts = [n for n in range(1, n_kv_heads + 1) if n_kv_heads % n == 0]
    if n_heads is not None:
        opts += [n for n in range(2 * n_kv_heads, n_heads + 1, n_kv_heads) if n_heads % n == 0]
    return opts


def check_kv_heads(n_kv_heads: int, n_heads: int, new_kv_heads, what: str = "--kv-heads") -> None:
    """Refuse a target that is neither a divisor of Hkv nor a multiple of Hkv dividing Hq (one line)."""
    if isinstance(new_kv_heads, bool) or not isinstance(new_kv_heads, int):
        raise GQAUserError(f"{what} must be a whole number, got {new_kv_heads!r}")
    if new_kv_heads < 1:
        raise GQAUserError(f"{what} must be >= 1, got {new_kv_heads}")
    if new_kv_heads > n_heads:
        raise GQAUserError(
            f"{what} {new_kv_heads} exceeds the checkpoint's {n_heads} query heads; "
            f"choose one of {kv_head_options(n_kv_heads, n_heads)}"
        )
    if new_kv_heads > n_kv_heads:
        if new_kv_heads % n_kv_heads or n_heads % new_kv_heads:
            raise GQAUserError(
                f"{what} {new_kv_heads} is not a multiple of the checkpoint's {n_kv_heads} KV heads that divides its "
                f"{n_heads} query heads, so heads cannot be replicated exactly; choose one of "
                f"{kv_head_options(n_kv_heads, n_heads)}"
            )
        return
    if n_kv_heads % new_kv_heads:
        raise GQAUserError(
            f"{what} {new_kv_heads} does not divide the checkpoint's {n_kv_heads} KV heads "
            f"({n_heads} query heads); choose one of {kv_head_options(n_kv_heads, n_heads)}"
        )


def contiguous_groups(n_kv_heads: int, new_kv_heads: int) -> Groups:
    """The paper's grouping: new KV head j pools old KV heads ``j*r .. j*r + r - 1`` (r = old // new)."""
    if new_kv_heads < 1 or n_kv_heads % new_kv_heads:
        raise GQAUserError(f"{new_kv_heads} KV heads do not divide {n_kv_heads}; choose a divisor of {n_kv_heads}")
    r = n_kv_heads // new_kv_heads
    return [list(range(j * r, (j + 1) * r)) for j in range(new_kv_heads)]


def expansion_groups(n_kv_heads: int, new_kv_heads: int) -> Groups:
    """Replication: new KV head j is a copy of old head ``j // r`` (r = new // old)."""
    if new_kv_heads % n_kv_heads:
        raise GQAUserError(f"{new_kv_heads} KV heads are not a multiple of {n_kv_heads}")
    r = new_kv_heads // n_kv_heads
    return [[j // r] for j in range(new_kv_heads)]


def groups_for(n_kv_heads: int, new_kv_heads: int) -> Groups:
    """Contiguous groups when reducing (or keeping) heads, replication when expanding."""
    if new_kv_heads > n_kv_heads:
        return expansion_groups(n_kv_heads, new_kv_heads)
    return contiguous_groups(n_kv_heads, new_kv_heads)


def is_expansion(groups: Groups, n_kv_heads: int) -> bool:
    return len(groups) > n_kv_heads


def validate_groups(groups, n_kv_heads: int) -> Groups:
    """Check that ``groups`` partitions ``range(n_kv_heads)`` into equal-size groups; return it as lists."""
    try:
        groups = [[int(h) for h in g] for g in groups]
    except (TypeError, ValueError):
        raise GQAUserError(f"groups must be a list of lists of KV head indices, got {groups!r}") from None
    if not groups or any(not g for g in groups):
        raise GQAUserError("groups must be a non-empty list of non-empty lists of KV head indices")
    flat = sorted(h for g in groups for h in g)
    if flat != list(range(n_kv_heads)):
        raise GQAUserError(f"groups must use each of the {n_kv_heads} KV heads exactly once, got {groups}")
    if len({len(g) for g in groups}) != 1:
        raise GQAUserError(f"groups must all have the same size to store a standard checkpoint, got {groups}")
    return groups


def query_order(groups: Groups, n_heads: int, n_kv_heads: int) -> list[int] | None:
    """New query head position -> old query head, or None when no query head moves.

    Old KV head k serves query heads k*g .. k*g + g - 1 (g = n_heads // n_kv_heads). New KV head j
    must serve the contiguous block of query heads j*len(groups[j])*g ..., so its groups' query heads
    are laid out group by group, in the order the group lists its KV heads. Replication (expansion
    groups) never moves a query head.
    """
    if is_expansion(groups, n_kv_heads):
        return None
    g = n_heads // n_kv_heads
    order = [k * g + i for group in groups for k in group for i in range(g)]
    return None if order == list(range(n_heads)) else order
