"""Reduce a model's KV heads layer by layer: group, align, merge, permute, measure.

:func:`reduce_kv_heads` turns a :class:`gqa.GQAForCausalLM` into one with fewer (possibly
per-layer) KV heads. Per layer: choose equal-size groups of old KV heads (``contiguous``: the GQA
paper's neighbours; ``similarity``: the balanced assignment minimising aligned distance on
calibration activations), align each group's heads (exact, folded into Q/K/V/O), merge each group
into one head, then permute query heads (q_proj rows, o_proj columns) so that group j's readers
are contiguous and query head h reads new KV head h // (Hq // N): a standard checkpoint.

Errors are *measured*: the layer's attention output on calibration inputs, converted vs original,
as a fraction of the residual stream's energy at that layer (so layers are comparable).

Memory (what lets a 7B model convert on a 24 GB host): with ``compute_dtype=torch.float32`` a bf16 /
fp16 model stays in its own dtype and only the layer being reduced is upcast (the numbers are those of
a float32 copy of the model); with ``share_unchanged=True`` the new model shares every tensor outside
the attention modules with the input model instead of copying it. (The calibration statistics have
their own budget: :func:`gqa.convert.calibrated.run._attention_sequences`.)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from gqa.convert.calibrated.align import align_groups, aligned_distance
from gqa.convert.calibrated.assign import balanced_groups
from gqa.convert.calibrated.fitting import MERGE_CHOICES, merge_group
from gqa.convert.calibrated.heads import HeadWeights, build_attention, split_heads
from gqa.convert.calibrated.placement import placed, upcast_forward
from gqa.convert.calibrated.stats import LayerStats, run_attention
from gqa.convert.groups import Groups, contiguous_groups, expansion_groups, kv_head_options, query_order
from gqa.errors import GQAUserError

__all__ = ["GROUPINGS", "MERGES", "LayerResult", "reduce_layer", "reduce_kv_heads", "error_curves", "distilled_error_curves", "layer_error"]

GROUPINGS = ("contiguous", "similarity")
MERGES = ("mean", "first", "weighted", "lsq", "fit")  # the calibrated subset of gqa.convert.merge.MERGES


@dataclass
class LayerResult:
    """What was done to one layer."""

    kv_heads_before: int
    kv_heads_after: int
    groups: Groups  # old KV heads pooled into each new one (one head repeated when replicating)
    merge: str  # the merge actually used ("fit" resolves to mean, weighted or lsq; "replicate" when expanding)
    error: float | None  # measured output error / residual energy (None without calibration)
    distance: list[list[float]] | None  # aligned head distances [Hkv, Hkv] (None without calibration)


@torch.no_grad()
def layer_error(original, converted, stats: LayerStats) -> float:
    """E||attn'(x) - attn(x)||^2 / E||h||^2 over the calibration samples of one layer."""
    x = stats.samples.to(device=original.q_proj.weight.device, dtype=original.q_proj.weight.dtype)  # (S, T, d)
    if x.numel() == 0:
        raise GQAUserError("no calibration samples were kept; give at least one sequence of calibration text")
    new = run_attention(converted, x, stats).double()
    diff = (new - run_attention(original, x, stats).double()).pow(2).sum(-1).mean().item()
    return diff / max(stats.residual_energy, 1e-300)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise GQAUserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _assemble(w: HeadWeights, groups: list[list[int]], merged: list[tuple[torch.Tensor, torch.Tensor]]) -> HeadWeights:
    """Aligned old heads + merged KV heads -> the new layer's weights, query heads permuted."""
    hq, hkv = w.q.shape[0], w.k.shape[0]
    order = query_order(groups, hq, hkv) or list(range(hq))  # new query position -> old query head
    return HeadWeights(
        q=w.q[order].clone(),
        k=torch.stack([k for k, _ in merged]),
        v=torch.stack([v for _, v in merged]),
        o=w.o[:, order].clone(),
        o_bias=w.o_bias,
    )


def reduce_layer(
    attn,
    n_kv_heads: int,
    stats: LayerStats | None,
    *,
    grouping: str = "similarity",
    align: bool = True,
    merge: str = "mean",
):
    """One layer's attention with ``n_kv_heads`` KV heads -> (new module, :class:`LayerResult`).

    ``n_kv_heads`` must divide the layer's KV heads. ``similarity``, ``align`` and merges other than
    ``mean`` need ``stats``; ``fit`` tries mean, weighted and lsq and keeps the best measured one.
    """
    _check_choice("grouping", grouping, GROUPINGS)
    _check_choice("merge", merge, MERGES)
    hkv, hq = attn.n_kv_heads, attn.n_heads
    if n_kv_heads not in kv_head_options(hkv, hq):
        raise GQAUserError(
            f"{n_kv_heads} KV heads are neither a divisor of this layer's {hkv} nor a multiple of it dividing its "
            f"{hq} query heads; choose one of {kv_head_options(hkv, hq)}"
        )
    if n_kv_heads > hkv:  # replication is exact: nothing to group, align, merge or measure
        groups = expansion_groups(hkv, n_kv_heads)
        w = split_heads(attn)
        merged = [(w.k[g[0]].clone(), w.v[g[0]].clone()) for g in groups]
        return build_attention(attn, _assemble(w, groups, merged)), LayerResult(
            hkv, n_kv_heads, groups, "replicate", 0.0, None
        )
    needs_stats = grouping == "similarity" or align or merge not in ("mean", "first")
    if needs_stats and stats is None:
        raise GQAUserError(
            "similarity grouping, alignment and merges other than mean/first need calibration text (--calib)"
        )
    w = split_heads(attn)
    align_k = attn.q_norm is None  # a per-head norm's [D] scale does not commute with the rotations
    dist = aligned_distance(w, stats.input_moment, align_k=align_k) if stats is not None else None
    if grouping == "similarity":
        groups = balanced_groups(dist, n_kv_heads)
    else:
        groups = contiguous_groups(hkv, n_kv_heads)
    if align:
        w, _, _ = align_groups(w, groups, stats.input_moment, align_k=align_k)
    inv_freq = attn.inv_freq if attn.rope_theta is not None else None
    candidates = list(MERGE_CHOICES) if merge == "fit" else [merge]
    best = None
    for method in candidates:
        merged = [merge_group(w, g, method, stats, inv_freq) for g in groups]
        new = build_attention(attn, _assemble(w, groups, merged))
        err = layer_error(attn, new, stats) if stats is not None and stats.samples.numel() else None
        if best is None or (err is not None and err < best[2]):
            best = (new, method, err)
    new, used, err = best
    dist_list = dist.tolist() if dist is not None else None
    return new, LayerResult(hkv, n_kv_heads, groups, used, err, dist_list)


def reduce_kv_heads(
    model,
    kv_heads: int | list[int],
    stats: list[LayerStats] | None = None,
    *,
    grouping: str = "similarity",
    align: bool = True,
    merge: str = "mean",
    progress: bool = True,
    share_unchanged: bool = False,
    compute_dtype: torch.dtype | None = None,
    release_stats: bool = False,
):
    """A copy of ``model`` (a :class:`gqa.GQAForCausalLM`) with ``kv_heads`` KV heads per layer.

    kv_heads: one count for every layer or a per-layer list; each must divide the layer's heads
        (query head h reads new KV head h // (Hq // N)).
    stats: from :func:`gqa.convert.calibrated.collect_statistics` (needed unless contiguous + mean + no align).
    share_unchanged: the new model's tensors outside the attention modules (embeddings, LM head, norms,
        MLPs: everything the conversion does not change) are the input model's tensors: the same
        storage held by separate ``nn.Parameter`` objects (same ``requires_grad``; tied weights stay
        tied). No memory is spent on a second copy, but an in-place change to one model's shared
        tensor (an optimizer step, ``copy_``, ``mul_``; replacing ``.data`` or the parameter is fine)
        changes the other too: share only when neither model is trained that way afterwards (the
        converter and :func:`gqa.convert.calibrated.distill.distill_local` never write them). Default
        False: a full copy, safe to train. Attention modules are never copied: each is rebuilt.
    compute_dtype: the dtype each layer is reduced in and the new attention modules are stored in
        (default: the model's own). The converter passes float32 for a bf16 / fp16 model: only the
        layer being reduced is upcast, and the result is that of converting a float32 copy.
    release_stats: set ``stats[i]`` to None once layer i is reduced (the caller's list is emptied as
        it goes), so statistics and new attention weights are never all held at once.
    Returns ``(new_model, [LayerResult per layer])``. The input model is not modified.
    """
    from gqa.progress import progress as progress_bar

    n_layers = len(model.layers)
    per_layer = [kv_heads] * n_layers if isinstance(kv_heads, int) else list(kv_heads)
    if len(per_layer) != n_layers:
        raise GQAUserError(f"kv_heads lists {len(per_layer)} layers; the model has {n_layers}")
    if stats is not None and len(stats) != n_layers:
        raise GQAUserError(f"stats cover {len(stats)} layers; the model has {n_layers}")
    new_model = _copy_without_attention(model, share_unchanged)
    results = []
    for i in progress_bar(range(n_layers), desc=f"reduce ({grouping}, {merge})", unit="layer", enabled=progress):
        with placed(model.layers[i].attn, dtype=compute_dtype):
            attn, res = reduce_layer(
                model.layers[i].attn,
                per_layer[i],
                stats[i] if stats is not None else None,
                grouping=grouping,
                align=align,
                merge=merge,
            )
        new_model.layers[i].attn = attn
        if release_stats and stats is not None:
            stats[i] = None
        results.append(res)
    new_model.config = dataclasses.replace(model.config, n_kv_heads=per_layer)
    return new_model.eval(), results


def _copy_without_attention(model, share_unchanged: bool):
    """``copy.deepcopy(model)`` whose attention modules are still the input's (the caller replaces every
    one), and, with ``share_unchanged``, whose other parameters hold the input's tensors."""
    memo: dict = {}
    attention = [block.attn for block in model.layers]
    for attn in attention:  # rebuilt by reduce_layer: copying them would only cost memory
        memo[id(attn)] = attn
    if share_unchanged:
        in_attention = {id(p) for attn in attention for p in attn.parameters()}
        for p in model.parameters():  # one entry per Parameter object: tied weights stay tied
            if id(p) not in in_attention and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
        for b in model.buffers():  # none outside attention in the gqa decoder; shared like the parameters
            memo.setdefault(id(b), b)
    return copy.deepcopy(model, memo)


def error_curves(
    model,
    stats: list[LayerStats],
    *,
    grouping: str = "similarity",
    align: bool = True,
    merge: str = "mean",
    calib_ids: torch.Tensor | None = None,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[dict[int, float]]:
    """Per layer, the measured error for every allowed KV-head count: ``[{heads: error}, ...]``.

    Each layer is reduced alone (the others untouched); keeping every head costs 0. The error is
    the layer's attention-output error relative to its residual energy (:func:`layer_error`), or,
    with ``calib_ids`` [N, T], the mean KL(original || model with this layer reduced) per token on
    those sequences: the end-to-end effect, in one currency for every layer.
    compute_dtype: as for :func:`reduce_kv_heads` (forward passes too run in it, a part at a time).
    """
    from gqa.progress import progress as progress_bar

    reference = None
    if calib_ids is not None:
        with torch.no_grad(), upcast_forward(model, compute_dtype):
            reference = torch.log_softmax(model(calib_ids).double(), -1)  # (N, T, V)
    curves = []
    for i in progress_bar(range(len(model.layers)), desc="error curves", unit="layer", enabled=progress):
        attn = model.layers[i].attn
        curve = {}
        with placed(attn, dtype=compute_dtype):
            for n in kv_head_options(attn.n_kv_heads):  # reductions only: a budget never adds heads
                if n == attn.n_kv_heads:
                    curve[n] = 0.0
                    continue
                new_attn, res = reduce_layer(attn, n, stats[i], grouping=grouping, align=align, merge=merge)
                if reference is None:
                    curve[n] = float(res.error)
                    continue
                curve[n] = _kl_with_attention(model, i, new_attn, calib_ids, reference, compute_dtype)
        curves.append(curve)
    return curves


def _kl_with_attention(model, i: int, attn, calib_ids, reference, compute_dtype) -> float:
    """Mean KL(original || model with layer i's attention replaced by ``attn``) per token on ``calib_ids``
    ``[N, T]``; ``reference`` is the original's float64 log-probabilities ``[N, T, V]``. The model is restored."""
    original = model.layers[i].attn
    model.layers[i].attn = attn
    try:
        with torch.no_grad(), upcast_forward(model, compute_dtype):
            logp = torch.log_softmax(model(calib_ids).double(), -1)
    finally:
        model.layers[i].attn = original
    return float((reference.exp() * (reference - logp)).sum(-1).mean())


def distilled_error_curves(
    model,
    stats: list[LayerStats],
    calib_ids: torch.Tensor,
    *,
    grouping: str = "similarity",
    align: bool = True,
    merge: str = "fit",
    distill_settings: dict | None = None,
    kl_sequences: int = 4,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[dict[int, float]]:
    """As :func:`error_curves` with ``calib_ids``, but each reduced layer is measured *after* local
    distillation: where distillation recovers a layer, a budget need not spend heads on it.

    For every head count n below a layer's own, all layers are reduced to n and distilled with the
    original model's inputs (:func:`gqa.convert.calibrated.distill.distill_local` with
    ``inputs="original"``: each layer's fit is then independent of the others, one pass for all
    layers); then each distilled layer alone replaces the original's and the mean KL(original || model)
    per token is measured on the first ``kl_sequences`` calibration sequences.
    calib_ids: int64 ``[N, T]`` (distillation holds out a slice of them, as in the conversion).
    distill_settings: keyword arguments of ``distill_local`` (steps, lr, params, seed, ...).
    Returns ``[{heads: KL}, ...]`` per layer (0 for the layer's own count).
    """
    from gqa.convert.calibrated.distill import distill_local

    with torch.no_grad(), upcast_forward(model, compute_dtype):
        reference = torch.log_softmax(model(calib_ids[:kl_sequences]).double(), -1)  # (N, T, V)
    own = [layer.attn.n_kv_heads for layer in model.layers]
    curves: list[dict[int, float]] = [{h: 0.0} for h in own]
    counts = sorted({n for h in own for n in kv_head_options(h) if n < h})
    for n in counts:
        per_layer = [n if n in kv_head_options(h) else h for h in own]
        student, _ = reduce_kv_heads(model, per_layer, stats, grouping=grouping, align=align, merge=merge,
                                     progress=False, share_unchanged=True, compute_dtype=compute_dtype)  # fmt: skip
        settings = {**(distill_settings or {}), "inputs": "original", "progress": progress}
        distill_local(model, student, calib_ids, **settings)
        for i, h in enumerate(per_layer):
            if h != own[i]:
                curves[i][n] = _kl_with_attention(
                    model, i, student.layers[i].attn, calib_ids[:kl_sequences], reference, compute_dtype
                )
        del student
    return curves
