"""Dynamic grouping (issue 25): per input, after the prefill, cluster each layer's KV heads by
how alike the attention they give this prompt's queries is, keep one merged K (and V) per cluster in the
cache, and decode with the per-sequence head map.

Which heads are alike is measured on the prompt itself. For KV heads i and j (KV head i serves query
heads h with ``h // g == i``, g = Hq // Hkv; for an MHA model every head is its own KV head):

    d(i, j) = 1/2 (TV(P_i[K_i], P_i[K_j]) + TV(P_j[K_j], P_j[K_i]))

where ``P_i[K]`` are the causal attention probabilities of head i's query heads over keys K on the last
``query_rows`` prompt positions and TV is the total-variation distance, averaged over query heads and
rows. Two heads are close when their keys are alike *as this prompt's queries see them*: the distance
measures both the keys and the scores they induce. Clusters come from deterministic average-linkage
agglomerative clustering over d (ties go to the lowest head indices), stopping at a cluster count (from a
KV-byte fraction) or before the measured error of the merged layer exceeds a threshold.

A cluster keeps the mean of its heads' K (after RoPE; RoPE is linear and shared by the heads, so this is
the RoPE of the mean key). V: ``values="merge"`` (default) keeps the mean V per cluster too, so the
cluster count is ``floor(fraction * Hkv)``; ``values="keep"`` keeps every head's V (CHAI's choice) and
merges only K, so the K cluster count is ``floor((2 * fraction - 1) * Hkv)`` (fractions above 1/2 only).
The measured errors of both are reported per layer (:class:`LayerGrouping`).

With ``allocation="measured"`` the fraction is the model's, not each layer's: per prompt, each layer's
cluster count is chosen (:func:`allocate_slots`, a dynamic program) to minimise the summed error the merges
add to the residual stream on the prompt (:func:`merge_path`), under the same total of K+V slots.

The prefill itself runs with every head (exact, as in CHAI); the decode steps then read the merged cache:
a static :class:`~gqa.cache.dynamic.DynamicKVCache` (:func:`dynamic_prefill`, ``gqa.generate``) or a paged
:class:`~gqa.cache.dynamic.PagedDynamicKVCache` (:func:`paged_dynamic_prefill`, the
:class:`~gqa.generation.ContinuousBatcher`; uniform allocation, K and V merged).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gqa.cache import ModelCache
from gqa.cache.dynamic import DynamicKVCache, PagedDynamicKVCache
from gqa.errors import GQAUserError
from gqa.rope import apply_rope, rope_cos_sin

__all__ = [
    "LayerGrouping",
    "DynamicOptions",
    "cluster_heads",
    "merge_path",
    "allocate_slots",
    "merged_kv",
    "fixed_grouping",
    "dynamic_prefill",
    "paged_dynamic_cache",
    "paged_dynamic_prefill",
    "options",
    "resolve_grouping",
]

VALUES = ("merge", "keep")


@dataclass(frozen=True)
class DynamicOptions:
    """How to group: exactly one of ``kv_fraction`` (target share of the layer's KV bytes, in (0, 1]) and
    ``max_error`` (largest mean TV distance of the merged layer's attention probabilities, >= 0);
    ``values`` "merge" or "keep" (see the module); ``query_rows``: prompt positions whose queries measure
    the distance (the last ones); ``allocation`` (with kv_fraction): "uniform" keeps the fraction in every
    layer, "measured" spreads the model's KV bytes over the layers per prompt, choosing each layer's cluster
    count to minimise the summed error its merge adds to the residual stream on the prompt (relative to the
    stream; :func:`merge_path`, :func:`allocate_slots`) under the same total."""

    kv_fraction: float | None = None
    max_error: float | None = None
    values: str = "merge"
    query_rows: int = 64
    allocation: str = "uniform"


ALLOCATIONS = ("uniform", "measured")


def options(kv_fraction=None, max_error=None, values="merge", query_rows=64, allocation="uniform") -> DynamicOptions:
    """Validated :class:`DynamicOptions`; bad values raise a one-line :class:`GQAUserError`."""
    if (kv_fraction is None) == (max_error is None):
        raise GQAUserError("dynamic grouping needs exactly one of kv_fraction (0 < f <= 1) and max_error (>= 0)")
    if kv_fraction is not None:
        if isinstance(kv_fraction, bool) or not isinstance(kv_fraction, (int, float)) or not 0 < kv_fraction <= 1:
            raise GQAUserError(f"kv_fraction must be a number in (0, 1], got {kv_fraction!r}")
    if max_error is not None:
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not max_error >= 0:
            raise GQAUserError(f"max_error must be a number >= 0, got {max_error!r}")
    if values not in VALUES:
        raise GQAUserError(f"values must be one of {', '.join(VALUES)}, got {values!r}")
    if values == "keep" and kv_fraction is not None and kv_fraction <= 0.5:
        raise GQAUserError(
            f'values="keep" keeps every V, so kv_fraction must be above 0.5, got {kv_fraction}; use values="merge"'
        )
    if isinstance(query_rows, bool) or not isinstance(query_rows, int) or query_rows < 1:
        raise GQAUserError(f"query_rows must be an integer >= 1, got {query_rows!r}")
    if allocation not in ALLOCATIONS:
        raise GQAUserError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "measured" and kv_fraction is None:
        raise GQAUserError('allocation="measured" spreads a KV-byte target over the layers: give kv_fraction')
    return DynamicOptions(
        None if kv_fraction is None else float(kv_fraction),
        None if max_error is None else float(max_error),
        values,
        query_rows,
        allocation,
    )


def resolve_grouping(grouping, kv_fraction=None, max_error=None) -> DynamicOptions | None:
    """:func:`gqa.generate`'s grouping arguments: None for static grouping (then kv_fraction / max_error must be unset), else the validated options."""
    if isinstance(grouping, DynamicOptions):  # options(...) with its own values / query_rows
        if kv_fraction is not None or max_error is not None:
            raise GQAUserError("pass kv_fraction / max_error inside the grouping options or beside grouping, not both")
        return grouping
    if grouping == "static":
        if kv_fraction is not None or max_error is not None:
            raise GQAUserError('kv_fraction and max_error apply to grouping="dynamic"; pass grouping="dynamic"')
        return None
    if grouping != "dynamic":
        raise GQAUserError(f'grouping must be "static" or "dynamic", got {grouping!r}')
    return options(kv_fraction, max_error)


@dataclass
class LayerGrouping:
    """One layer's grouping of one sequence.

    clusters: KV heads per cluster, each sorted, clusters ordered by their first head (cluster c = K slot c).
    k_index / v_index ``[Hq]`` long: the K / V slot query head h reads (query head h belongs to KV head
        ``h // g``).
    k_merge ``[C, Hkv]`` / v_merge ``[Sv, Hkv]``: slot = merge @ heads (means over a cluster; v_merge is the
        identity with ``values="keep"``).
    score_error: mean TV distance between the original and the merged layer's attention probabilities on
        the measured rows (K merged); value_error: relative Frobenius error of the merged V against each head's
        own V (0 when V is kept).
    """

    clusters: tuple[tuple[int, ...], ...]
    k_index: torch.Tensor
    v_index: torch.Tensor
    k_merge: torch.Tensor
    v_merge: torch.Tensor
    score_error: float
    value_error: float

    @property
    def slots(self) -> int:
        """K plus V slots held per token (2 Hkv for the unmerged layer)."""
        return self.k_merge.shape[0] + self.v_merge.shape[0]


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, M, D] (the last M of T positions), k [H, T, D] -> causal probabilities [H, M, T] in fp32."""
    m, t = q.shape[1], k.shape[1]
    s = torch.einsum("hmd,htd->hmt", q.float(), k.float()) * scale  # (H, M, T)
    rows = torch.arange(t - m, t, device=q.device)[:, None]  # absolute position of each query row
    s = s.masked_fill(torch.arange(t, device=q.device)[None, :] > rows, float("-inf"))  # bottom-right causal
    return s.softmax(-1)


def _merge_matrix(clusters, hkv: int) -> torch.Tensor:
    w = torch.zeros(len(clusters), hkv)  # (C, Hkv)
    for c, members in enumerate(clusters):
        w[c, list(members)] = 1.0 / len(members)
    return w


def _score_error(q, k, clusters, g: int, scale: float, base: torch.Tensor) -> float:
    """Mean TV distance of every query head's probabilities when its KV head's K is its cluster's mean."""
    kf = k.float()
    merged = torch.empty_like(kf)  # (Hkv, T, D): each head replaced by its cluster mean
    for members in clusters:
        merged[list(members)] = kf[list(members)].mean(0)
    p = _probs(q, merged.repeat_interleave(g, 0), scale)  # (Hq, M, T); query head h reads KV head h // g
    return float(0.5 * (p - base).abs().sum(-1).mean())


def _distance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The module's head distance d(i, j), ``[Hkv, Hkv]`` float64 symmetric."""
    hq, m, d = q.shape
    hkv, t, _ = k.shape
    g = hq // hkv
    qg = q.float().reshape(hkv, g * m, d)  # (Hkv, g*M, D): the rows of each KV head's query heads
    kf = k.float()
    hide = torch.arange(t)[None, :] > (torch.arange(g * m) % m + (t - m))[:, None]  # (g*M, T) bottom-right causal
    # probs[j][i]: KV head i's query rows over KV head j's keys; probs[i][i] over its own.
    probs = [torch.matmul(qg, kf[j].T).mul_(scale).masked_fill_(hide, float("-inf")).softmax(-1) for j in range(hkv)]
    own = torch.stack([probs[i][i] for i in range(hkv)])  # (Hkv, g*M, T)
    tv = torch.empty(hkv, hkv)  # tv[i, j] = TV(P_i[K_i], P_i[K_j]), averaged over rows
    for j in range(hkv):
        tv[:, j] = (probs[j] - own).abs_().sum(-1).mean(-1) * 0.5
    dist = (0.5 * (tv + tv.T)).double()  # (Hkv, Hkv) symmetric
    return dist


def cluster_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_clusters: int | None = None,
    max_error: float | None = None,
    values: str = "merge",
    scale: float | None = None,
) -> LayerGrouping:
    """Cluster one layer's KV heads for one sequence, on its prompt.

    Args:
        q: ``[Hq, M, D]`` queries (after RoPE / QK-norm) of the last M prompt positions.
        k, v: ``[Hkv, T, D]`` the prompt's keys (after RoPE) and values, T >= M. Query head h uses KV head
            ``h // (Hq // Hkv)``; for an MHA model Hkv = Hq.
        n_clusters: the number of K clusters (1..Hkv); or
        max_error: merge while the mean TV distance of the merged layer's probabilities stays <= this.
        values: "merge" (one mean V per cluster) or "keep" (every head's V; only K is merged).
        scale: softmax scale (default D ** -0.5).

    Deterministic: average-linkage agglomerative clustering over the distance of the module docstring,
    ties broken by the lowest cluster indices. Returns a :class:`LayerGrouping`.
    """
    hq, m, d = q.shape
    hkv, t, _ = k.shape
    if hq % hkv or v.shape != k.shape or m > t or q.shape[2] != k.shape[2]:
        raise GQAUserError(f"cluster_heads takes q [Hq, M, D], k/v [Hkv, T, D] with Hkv | Hq, M <= T; got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if (n_clusters is None) == (max_error is None):
        raise GQAUserError("cluster_heads needs exactly one of n_clusters and max_error")
    if n_clusters is not None and not 1 <= n_clusters <= hkv:
        raise GQAUserError(f"n_clusters must be in 1..{hkv}, got {n_clusters}")
    if values not in VALUES:
        raise GQAUserError(f"values must be one of {', '.join(VALUES)}, got {values!r}")
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    dist = _distance(q, k, scale)
    base = _probs(q, k.repeat_interleave(g, 0), scale)  # (Hq, M, T) the original probabilities

    clusters: list[tuple[int, ...]] = [(i,) for i in range(hkv)]
    error = 0.0
    target = n_clusters if n_clusters is not None else 1
    for trial in _agglomerate(dist, hkv, target):
        trial_error = _score_error(q, k, trial, g, scale, base)
        if max_error is not None and trial_error > max_error:
            break
        clusters, error = trial, trial_error
    return _layer_grouping(clusters, error, hq, v, values)


def _agglomerate(dist: torch.Tensor, hkv: int, target: int):
    """Average-linkage merges over ``dist`` [Hkv, Hkv]: yields the clusters after each merge, down to ``target``
    clusters (each sorted, ordered by first head; the first, lowest, pair wins ties)."""
    clusters: list[tuple[int, ...]] = [(i,) for i in range(hkv)]
    while len(clusters) > target:
        best, pair = math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(dist[list(clusters[a])][:, list(clusters[b])].mean())
                if link < best:  # strict: the first (lowest) pair wins ties
                    best, pair = link, (a, b)
        a, b = pair
        clusters = [c for i, c in enumerate(clusters) if i not in (a, b)] + [tuple(sorted(clusters[a] + clusters[b]))]
        clusters.sort(key=lambda c: c[0])
        yield clusters


def _layer_grouping(clusters, error: float, hq: int, v: torch.Tensor, values: str) -> LayerGrouping:
    hkv = v.shape[0]
    g = hq // hkv
    of_head = torch.empty(hkv, dtype=torch.long)
    for c, members in enumerate(clusters):
        of_head[list(members)] = c
    kv_of_query = torch.arange(hq) // g  # query head h -> its KV head
    k_merge = _merge_matrix(clusters, hkv)
    k_index = of_head[kv_of_query]
    if values == "merge":
        v_merge, v_index = k_merge.clone(), k_index.clone()
        vf = v.float()
        merged_v = (k_merge @ vf.reshape(hkv, -1))[of_head].view_as(vf)  # (Hkv, T, D) each head's cluster mean
        value_error = float((merged_v - vf).norm() / vf.norm().clamp_min(1e-30))
    else:
        v_merge, v_index, value_error = torch.eye(hkv), kv_of_query.clone(), 0.0
    return LayerGrouping(tuple(clusters), k_index, v_index, k_merge, v_merge, error, value_error)


def merge_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, values: str = "merge",
               scale: float | None = None, o_proj: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> list[tuple[tuple[tuple[int, ...], ...], float]]:  # fmt: skip
    """The clusterings :func:`cluster_heads` passes through, from Hkv clusters down to 1, each with the error of
    the layer's attention output on the measured rows when K (and V, with ``values="merge"``) are the cluster
    means, o = P V per query head:

    * with ``o_proj`` (the layer's output projection weight ``[d_model, Hq * D]``) and ``residual`` (the
      residual stream entering the layer on the measured rows, ``[M, d_model]``): what the error adds to the
      residual stream, relative to it, ``||(o' - o) W_o^T||_F / ||residual||_F`` (comparable across layers:
      the one :func:`allocate_slots` spreads a model's budget by);
    * else ``||o' - o||_F / ||o||_F`` over every query head and row.

    Same other arguments as :func:`cluster_heads`. Returns ``[(clusters, error)]``; entry i has Hkv - i
    clusters (entry 0: every head alone, error 0)."""
    hq, m, d = q.shape
    hkv, t, _ = k.shape
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    kf, vf = k.float(), v.float()
    base = _probs(q, kf.repeat_interleave(g, 0), scale)  # (Hq, M, T)
    out = torch.einsum("hmt,htd->hmd", base, vf.repeat_interleave(g, 0))  # (Hq, M, D) the original output
    if (o_proj is None) != (residual is None):
        raise GQAUserError("merge_path takes o_proj and residual together")
    w_o = None if o_proj is None else o_proj.detach().float()  # (d_model, Hq * D)
    norm = float((out if residual is None else residual.float()).norm().clamp_min(1e-30))

    def error(o: torch.Tensor) -> float:
        delta = o - out  # (Hq, M, D)
        if w_o is not None:
            delta = delta.transpose(0, 1).reshape(m, hq * d) @ w_o.T  # (M, d_model): as added to the residual
        return float(delta.norm()) / norm

    dist = _distance(q, k, scale)
    path = [(tuple((i,) for i in range(hkv)), 0.0)]
    for clusters in _agglomerate(dist, hkv, 1):
        km, vm = kf.clone(), vf.clone()  # (Hkv, T, D): each head replaced by its cluster mean
        for members in clusters:
            km[list(members)] = kf[list(members)].mean(0)
            if values == "merge":
                vm[list(members)] = vf[list(members)].mean(0)
        p = _probs(q, km.repeat_interleave(g, 0), scale)
        o = torch.einsum("hmt,htd->hmd", p, vm.repeat_interleave(g, 0))
        path.append((tuple(clusters), error(o)))
    return path


def allocate_slots(costs: list[list[float]], slot_counts: list[list[int]], budget: int) -> list[int]:
    """Pick one option per layer minimising the summed cost with the summed slots <= budget (a dynamic program;
    ties go to more slots). costs[l][i] / slot_counts[l][i]: option i of layer l. Returns the chosen indices."""
    best = {0: (0.0, [])}  # slots used -> (cost, choices)
    for cost, slots in zip(costs, slot_counts, strict=True):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (c0, picks) in best.items():
            for i, (c, s) in enumerate(zip(cost, slots, strict=True)):
                u = used + s
                if u > budget:
                    continue
                if u not in nxt or c0 + c < nxt[u][0]:  # strict: the first option found wins ties
                    nxt[u] = (c0 + c, picks + [i])
        if not nxt:
            raise GQAUserError(f"a KV budget of {budget} slots cannot hold one K/V slot per layer; raise kv_fraction")
        best = nxt
    return min(best.items(), key=lambda item: (item[1][0], -item[0]))[1][1]  # least cost, then most slots


def fixed_grouping(clusters, n_heads: int, n_kv_heads: int) -> LayerGrouping:
    """A given grouping (clusters of KV heads, each sorted, ordered by first head) as a :class:`LayerGrouping`
    with K and V merged (errors not measured: NaN); e.g. ``[(0, 1), (2, 3), ...]`` is static contiguous pooling."""
    k_merge = _merge_matrix(clusters, n_kv_heads)
    of_head = torch.empty(n_kv_heads, dtype=torch.long)
    for c, members in enumerate(clusters):
        of_head[list(members)] = c
    k_index = of_head[torch.arange(n_heads) // (n_heads // n_kv_heads)]
    nan = float("nan")
    return LayerGrouping(
        tuple(tuple(c) for c in clusters), k_index, k_index.clone(), k_merge, k_merge.clone(), nan, nan
    )


def merged_kv(grouping: LayerGrouping, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v ``[Hkv, T, D]`` -> the slots to keep: ``[C, T, D]`` K (cluster means) and ``[Sv, T, D]`` V."""
    hkv = k.shape[0]
    km = (grouping.k_merge.to(k) @ k.reshape(hkv, -1)).view(-1, *k.shape[1:])  # (C, T, D)
    vm = (grouping.v_merge.to(v) @ v.reshape(hkv, -1)).view(-1, *v.shape[1:])  # (Sv, T, D)
    return km, vm


@contextmanager
def capture_queries(model, rows: int, residuals: list | None = None):
    """Record each layer's queries (after QK-norm and RoPE) of the last ``rows`` positions of one forward:
    yields a list filled with ``[B, Hq, M, D]`` per layer, M = min(rows, T). With ``residuals`` (a list), it
    is filled with the residual stream entering each decoder layer on those rows, ``[B, M, d_model]``."""
    out: list[torch.Tensor] = []
    handles = []
    if residuals is not None:
        for layer in model.layers:
            handles.append(layer.register_forward_pre_hook(lambda _m, a, kw: residuals.append(
                (a[0] if a else kw["x"])[:, -rows:]), with_kwargs=True))  # fmt: skip

    def hook(module, args, kwargs, _result):
        x = args[0] if args else kwargs["x"]
        b, t, _ = x.shape
        m = min(rows, t)
        q = module.q_proj(x[:, -m:]).view(b, m, module.n_heads, module.head_dim).transpose(1, 2)  # (B, Hq, M, D)
        if module.q_norm is not None:
            q = module.q_norm(q)
        if module.rope_theta is not None:
            rope = kwargs.get("rope")
            if rope is None:
                positions = kwargs.get("positions")
                positions = torch.arange(t, device=x.device) if positions is None else positions
                rope = rope_cos_sin(positions, module.inv_freq)
            cos, sin = rope  # (T, D) or (B, T, D)
            q = apply_rope(q, cos[..., -m:, :], sin[..., -m:, :])
        out.append(q)

    for layer in model.layers:
        handles.append(layer.attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _n_clusters(opts: DynamicOptions, hkv: int) -> int | None:
    if opts.kv_fraction is None:
        return None
    f = opts.kv_fraction
    n = math.floor((f if opts.values == "merge" else 2 * f - 1) * hkv + 1e-9)  # at most the target bytes
    return max(1, min(hkv, n))


def _prefill_and_cluster(model, input_ids, pad, opts: DynamicOptions, fixed_clusters, step_kw):
    """Prefill with every head into a static cache of T slots and cluster each sequence's heads per layer on
    its own prompt tokens: ``(full_cache, logits [B, 1, vocab], groupings [B][layer], cluster_s)``."""
    if getattr(model.config, "layer_window", None) is not None and any(
        model.config.layer_window(i) is not None for i in range(len(model.layers))
    ):
        raise GQAUserError("dynamic grouping supports models whose layers all attend globally (no sliding windows)")
    cache = model.make_cache(input_ids.shape[0], input_ids.shape[1])
    residuals = [] if opts.allocation == "measured" and fixed_clusters is None else None
    with capture_queries(model, opts.query_rows, residuals) as queries:
        logits = model(input_ids, cache=cache, logits_to_keep=1, **step_kw)  # (B, 1, vocab)
    t0 = time.perf_counter()
    b, t = input_ids.shape
    pads = pad.tolist()
    groupings: list[list[LayerGrouping]] = [[] for _ in range(b)]
    if fixed_clusters is None and opts.allocation == "measured":
        for i in range(b):
            groupings[i] = _measured_grouping(model, cache, queries, residuals, i, pads[i], t, opts)
        return cache, logits, groupings, time.perf_counter() - t0
    for li, layer in enumerate(model.layers):
        k_all, v_all = cache[li].k[:, :, :t], cache[li].v[:, :, :t]  # (B, Hkv, T, D)
        hkv = k_all.shape[1]
        for i in range(b):
            if fixed_clusters is not None:  # a given (static) grouping through the same cache, for comparisons
                groupings[i].append(fixed_grouping(fixed_clusters[li], layer.attn.n_heads, hkv))
                continue
            m = min(opts.query_rows, t - pads[i])
            groupings[i].append(cluster_heads(
                queries[li][i, :, -m:], k_all[i, :, pads[i] :], v_all[i, :, pads[i] :],
                n_clusters=_n_clusters(opts, hkv), max_error=opts.max_error, values=opts.values,
                scale=layer.attn.scale,
            ))  # fmt: skip
    return cache, logits, groupings, time.perf_counter() - t0


def _measured_grouping(model, cache, queries, residuals, i: int, pad: int, t: int, opts) -> list[LayerGrouping]:
    """Sequence i's groupings with the model's KV-byte target spread over the layers by the measured error each
    layer's merge adds to the residual stream (:func:`merge_path` with ``o_proj`` and ``residual``)."""
    m = min(opts.query_rows, t - pad)
    paths, inputs = [], []
    for li, layer in enumerate(model.layers):
        q, k, v = queries[li][i, :, -m:], cache[li].k[i, :, pad:t], cache[li].v[i, :, pad:t]
        paths.append(merge_path(q, k, v, values=opts.values, scale=layer.attn.scale, o_proj=layer.attn.o_proj.weight,
                                residual=residuals[li][i, -m:]))  # fmt: skip  # entry j: Hkv - j clusters
        inputs.append((q, v))
    hkv = [len(p) for p in paths]

    def slots(h: int, c: int) -> int:  # K plus V slots of c clusters
        return 2 * c if opts.values == "merge" else c + h

    budget = math.floor(opts.kv_fraction * 2 * sum(hkv) + 1e-9)
    costs = [[err for _, err in path] for path in paths]
    counts = [[slots(h, h - j) for j in range(h)] for h in hkv]
    picks = allocate_slots(costs, counts, budget)
    return [
        _layer_grouping(paths[li][j][0], paths[li][j][1], inputs[li][0].shape[0], inputs[li][1], opts.values)
        for li, j in enumerate(picks)
    ]


@torch.inference_mode()
def dynamic_prefill(model, input_ids: torch.Tensor, pad: torch.Tensor, max_seq_len: int, opts: DynamicOptions,
                    *, fixed_clusters: list | None = None, **step_kw):  # fmt: skip
    """Prefill ``input_ids`` ``[B, T]`` (left-padded by ``pad`` ``[B]``) with every head into a static cache of
    T slots, cluster each sequence's heads per layer on its own prompt tokens, and move the prompt into a
    :class:`~gqa.cache.ModelCache` of :class:`DynamicKVCache` layers of ``max_seq_len`` slots (the full-head
    cache is then dropped). ``fixed_clusters`` (per layer, clusters of KV heads) replaces the clustering by
    a given grouping, for comparisons.

    Returns ``(dynamic_cache, logits [B, 1, vocab], groupings, cluster_s)``: groupings[b][layer] a
    :class:`LayerGrouping`; cluster_s the wall time of the clustering and cache build.
    """
    full, logits, groupings, cluster_s = _prefill_and_cluster(model, input_ids, pad, opts, fixed_clusters, step_kw)
    t0 = time.perf_counter()
    b, t = input_ids.shape
    layers = []
    for li in range(len(model.layers)):
        k_all, v_all = full[li].k[:, :, :t], full[li].v[:, :, :t]  # (B, Hkv, T, D)
        hkv = k_all.shape[1]
        sk = max(groupings[i][li].k_merge.shape[0] for i in range(b))
        sv = max(groupings[i][li].v_merge.shape[0] for i in range(b))
        k_merge = torch.zeros(b, sk, hkv)
        v_merge = torch.zeros(b, sv, hkv)
        for i in range(b):
            gr = groupings[i][li]
            k_merge[i, : gr.k_merge.shape[0]] = gr.k_merge
            v_merge[i, : gr.v_merge.shape[0]] = gr.v_merge
        k_index = torch.stack([groupings[i][li].k_index for i in range(b)])  # (B, Hq)
        v_index = torch.stack([groupings[i][li].v_index for i in range(b)])
        dyn = DynamicKVCache(
            k_merge, v_merge, k_index, v_index, max_seq_len, full[li].head_dim, dtype=full[li].k.dtype,
            device=full[li].k.device,
        )  # fmt: skip
        dyn.write_slots(*dyn.merge(k_all, v_all), 0)  # (B, S, T, D): the prompt, padding slots merged too (masked)
        layers.append(dyn)
    return ModelCache(layers), logits, groupings, cluster_s + time.perf_counter() - t0


def check_paged(opts: DynamicOptions) -> None:
    """A paged cache's pages hold a fixed number of slots per layer, K and V alike: refuse what needs more."""
    if opts.kv_fraction is None:
        raise GQAUserError("dynamic grouping over a paged cache takes kv_fraction (pages hold a fixed number of "
                           "slots per layer), not max_error; use the static cache (gqa.generate) for max_error")  # fmt: skip
    if opts.allocation != "uniform":
        raise GQAUserError(
            "dynamic grouping over a paged cache holds the same slots per layer in every sequence "
            '(allocation="uniform"); use the static cache (gqa.generate) for allocation="measured"'
        )
    if opts.values != "merge":
        raise GQAUserError('dynamic grouping over a paged cache merges K and V alike (values="merge"); use the '
                           'static cache (gqa.generate) for values="keep"')  # fmt: skip


def paged_dynamic_cache(model, opts: DynamicOptions, num_pages: int, page_size: int = 16) -> PagedDynamicKVCache:
    """A :class:`PagedDynamicKVCache` for ``model`` whose pages hold each layer's cluster count at
    ``opts.kv_fraction`` (in the model's dtype and device)."""
    check_paged(opts)
    p = next(model.parameters())
    hkv = list(model.config.kv_heads_per_layer)
    slots = [_n_clusters(opts, h) for h in hkv]
    return PagedDynamicKVCache(hkv, slots, model.config.resolved_head_dim, num_pages, page_size,
                               dtype=p.dtype, device=p.device)  # fmt: skip


@torch.inference_mode()
def paged_dynamic_prefill(model, cache: PagedDynamicKVCache, seq, prompt: list[int], opts: DynamicOptions):
    """Prefill one prompt with every head, cluster its heads per layer on it, add it to ``cache`` as ``seq``
    with that map and store its merged prompt K/V in the pages. Returns
    ``(logits [1, 1, vocab], groupings [layer], cluster_s)``; the caller has checked the pool has room."""
    check_paged(opts)
    device = cache.k_pages[0].device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    t = ids.shape[1]
    full, logits, groupings, cluster_s = _prefill_and_cluster(
        model, ids, torch.zeros(1, dtype=torch.long), opts, None, {}
    )
    t0 = time.perf_counter()
    grouping = groupings[0]
    cache.add_sequence(seq, [(g.k_merge, g.k_index) for g in grouping])
    cache.reserve(seq, t)
    for li, g in enumerate(grouping):
        w = g.k_merge.to(full[li].k)  # (S, Hkv)
        k = torch.einsum("sh,bhtd->bstd", w, full[li].k[:, :, :t])  # (1, S, T, D)
        v = torch.einsum("sh,bhtd->bstd", w, full[li].v[:, :, :t])
        cache.write(li, [seq], k, v)
    cache.advance([seq], t)
    return logits, grouping, cluster_s + time.perf_counter() - t0
