"""Convert a GQA / MHA attention into a low-rank latent one (:class:`gqa.latent.LatentAttention`) from
calibration moments, with no training (local distillation and ``gqa uptrain`` then fit it).

Per layer, from the input moment ``M = E[x~ x~^T]`` (x~ = [x, 1], ``[d+1, d+1]`` float64,
:class:`gqa.convert.calibrated.stats.LayerStats`):

1. **Which frequency pairs keep RoPE.** Rotation preserves each pair's norm, so the RMS norm of query
   head h's pair i is ``sqrt(trace(Wq_hi M Wq_hi^T))`` before or after RoPE. A KV group keeps the
   ``rope_dim / 2`` pairs with the largest ``sum over its query heads of |q_hi| |k_gi|`` (MHA2MLA's 2-norm
   criterion: the pairs that carry most of the score). The other pairs lose their rotation.
2. **The latent.** Y = [K on the unrotated dims of every group; V of every group] = W x~. Each block is
   scaled to unit energy (so neither K nor V dominates), and the latent is the top-R principal subspace
   of Y under M: ``kv_down = U^T S W``, K / V up-projections ``S^-1 U`` (Eckart-Young: the least-squares
   best rank-R map of W x~ on the calibration distribution). Each query head's up-projections start as
   its group's; distillation may then tell them apart.

At ``rope_dim = head_dim`` and ``rank = Hkv * head_dim`` (all V dims; no unrotated K) the conversion is
exact. The rotated dims of each group go into ``k_rope_proj``; query heads are permuted to
``[unrotated | rotated]``; o_proj is unchanged.

3. **One shared rotated head (``shared_rope``, DeepSeek-V2's layout).** DeepSeek-V2 files (transformers,
   llama.cpp's ``deepseek2``) hold one rotated key head for all query heads, at the evenly spaced
   frequencies ``base' ** (-2 i / rope_dim)``. The layer then keeps pairs ``0, s, 2s, ...`` of the original
   head (the stride s with the largest summed score; ``base' = theta ** (s rope_dim / D)``), and on each
   kept pair the Hkv groups' keys, read as complex numbers ``kappa_g`` (RoPE multiplies every one by the
   same phase), become one: ``sigma = sum_g b_g kappa_g`` and ``kappa_g ~ u_g sigma`` from the top eigenvector
   of their covariance weighted by each group's query energy on the pair (a complex scale commutes with the
   rotation, so the approximation holds at every position). Query head h of group g takes
   ``conj(u_g) q_h`` on that pair. With one source KV group this is exact.
4. **What an unrotated pair's query becomes.** A query at m and a key at n score ``(R(theta Δ) q) . k`` on
   a pair (Δ = m - n). Without rotation the best fixed stand-in is its expectation over where attention
   goes: ``E[R(theta Δ)] = [[a, -b], [b, a]]``, a = E cos(theta Δ), b = E sin(theta Δ), weighted by each
   head's measured attention mass per offset (``offset_weights``). A high-frequency pair averages out
   (a, b ~ 0: its unrotated score would be noise), a low-frequency one stays (a ~ 1). Without offset
   weights the rotation is dropped (a = 1, b = 0).
5. **QK-norm** (Gemma-3, Qwen3): the latent factorises the keys *before* their norm, and the layer keeps the
   norm (:mod:`gqa.latent`: each head's RMS scale stored per token, the per-dim scales permuted with the dims).
   Step 1 scores each pair after the norm (its energy times the norm's scale squared, over the head's mean
   energy). Step 4 is skipped (the rotation is dropped): a rotation folded into the query before its norm
   would change the norm, and applied after the norm instead it measured worse on Gemma-3-270M (x5.27
   against x3.32 at 1/4 of the bytes, ``docs/results/latent-pareto-gemma3.md``). At full rank the
   conversion is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError

__all__ = [
    "check_latent_target",
    "LatentFit",
    "latent_model",
    "latent_from_attention",
    "rope_pair_scores",
    "max_latent_rank",
    "shared_rope_pairs",
]


@dataclass
class LatentFit:
    """One layer's conversion: the kept pairs per group, the share of the score energy their pairs carry
    (``rope_score_kept``) and of the (scaled) K/V energy the rank-R latent keeps (``kv_energy_kept``)."""

    layer: int
    rank: int
    rope_dim: int
    rope_pairs: list[list[int]]
    rope_score_kept: float
    kv_energy_kept: float
    rope_merge_kept: float = (
        1.0  # shared_rope: the groups' (query-weighted) key energy on the kept pairs that one head keeps
    )


#: Why a QK-norm model cannot take one shared rotated head (DeepSeek-V2's files have no key norm).
NO_SHARED_QK_NORM = (
    "--latent-rope shared (DeepSeek-V2's layout, what --export hf / gguf write) has no key norm for QK-norm "
    "models; use --latent-rope groups with --export gqa"
)


def max_latent_rank(head_dim: int, n_kv_heads: int, rope_dim: int) -> int:
    """The largest useful rank: every unrotated K dim and every V dim of every group."""
    return n_kv_heads * (2 * head_dim - rope_dim)


def check_latent_target(cfg, rank: int, rope_dim: int, *, shared: bool = False) -> None:
    """A one-line error, before any calibration, when ``cfg`` (a :class:`gqa.GQAConfig`) cannot take a
    rank-``rank`` latent with ``rope_dim`` rotated dims per group (``shared``: one shared rotated head)."""
    d = cfg.resolved_head_dim
    if shared and cfg.qk_norm:
        raise GQAUserError(NO_SHARED_QK_NORM)
    if rope_dim > d:
        raise GQAUserError(
            f"--latent-rope-dim {rope_dim} is more than the head's {d} dims; use an even number up to {d}"
        )
    top = min(max_latent_rank(d, h, rope_dim) for h in cfg.kv_heads_per_layer)
    if rank > top:
        raise GQAUserError(
            f"--kv-latent {rank} is more than the {top} K/V dims a layer has to factorise; use 1 to {top}"
        )


def _aug(linear) -> torch.Tensor:
    """[out, d+1] float64: the weight with the bias (or zeros) as the last column."""
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1)


def _row_energy(w: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E[(w x~)^2] per row of w ``[n, d+1]``: diag(w M w^T) ``[n]``."""
    return ((w @ moment) * w).sum(-1).clamp_min(0)


def rope_pair_scores(attn, moment: torch.Tensor) -> torch.Tensor:
    """``[Hkv, D/2]``: per KV group and frequency pair, sum over the group's query heads of the RMS norms
    of the query pair times the key pair (see the module doc)."""
    hq, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    half, g = d // 2, hq // hkv
    q = _pair_norms(_row_energy(_aug(attn.q_proj), moment).view(hq, d), attn.q_norm)  # (Hq, D/2)
    k = _pair_norms(_row_energy(_aug(attn.k_proj), moment).view(hkv, d), attn.k_norm)  # (Hkv, D/2)
    return q.view(hkv, g, half).sum(1) * k


def _pair_norms(energy: torch.Tensor, norm) -> torch.Tensor:
    """RMS norm of each pair (dims i and i + D/2) from per-dim energies ``[H, D]``; after a per-head RMSNorm
    (``norm``, or None) a dim's energy is its share of the head's mean energy times the norm's scale squared."""
    if norm is not None:
        energy = energy / energy.mean(-1, keepdim=True).clamp_min(1e-300) * norm.weight.detach().double() ** 2
    h, d = energy.shape
    return energy.view(h, 2, d // 2).sum(1).sqrt()


def _dims(pairs: list[int], half: int) -> tuple[list[int], list[int]]:
    """Head dims of the unrotated part and of the rotated part ([first halves | second halves]) for ``pairs``."""
    keep = set(pairs)
    nope = [i for i in range(half) if i not in keep]
    return nope + [i + half for i in nope], list(pairs) + [i + half for i in pairs]


def shared_rope_pairs(scores: torch.Tensor, rope_dim: int) -> tuple[list[int], int]:
    """The pairs ``0, s, 2s, ...`` (rope_dim / 2 of them) one shared rotated head keeps, and the stride s:
    the one with the largest summed score (``scores`` ``[Hkv, D/2]``) among those that fit in the head."""
    n, half = rope_dim // 2, scores.shape[1]
    if n <= 1:
        return list(range(n)), 1
    total = scores.sum(0)
    strides = range(1, (half - 1) // (n - 1) + 1)
    best = max(strides, key=lambda s: total[torch.arange(n) * s].sum().item())
    return [best * i for i in range(n)], best


def _complex_rows(w: torch.Tensor, pair: int, half: int) -> torch.Tensor:
    """Rows of pair ``pair`` (dims pair and pair + D/2) of ``w`` ``[H, D, d+1]`` as complex ``[H, d+1]``."""
    return torch.complex(w[:, pair], w[:, pair + half])


def _shared_rope(wq: torch.Tensor, wk: torch.Tensor, pairs: list[int], moment: torch.Tensor):
    """One rotated key head for every group (module doc, step 3): query rope rows ``[Hq, r, d+1]``, key rope
    rows ``[r, d+1]`` (pair i in dims i and i + r/2) and the share of the weighted key energy kept."""
    hq, d, width = wq.shape
    hkv, half, n = wk.shape[0], d // 2, len(pairs)
    g = hq // hkv
    mc = moment.to(torch.complex128)
    q_rows = wq.new_zeros(hq, 2 * n, width)
    k_rows = wq.new_zeros(2 * n, width)
    kept = total = 0.0
    for i, p in enumerate(pairs):
        kc, qc = _complex_rows(wk, p, half), _complex_rows(wq, p, half)  # (Hkv, d+1), (Hq, d+1)
        q_energy = ((qc @ mc) * qc.conj()).real.sum(-1).clamp_min(0).view(hkv, g).sum(1)  # (Hkv,)
        root = q_energy.sqrt()
        cov = root[:, None] * (kc @ mc @ kc.conj().T) * root[None, :]  # (Hkv, Hkv) Hermitian
        evals, evecs = torch.linalg.eigh(cov)
        v = evecs[:, -1]
        kept += evals[-1].clamp_min(0).item()
        total += evals.clamp_min(0).sum().item()
        sigma = (v.conj() * root).to(kc.dtype) @ kc  # (d+1,) the shared key pair
        u = torch.where(root > 0, v / root.clamp_min(1e-300), torch.zeros_like(v))  # kappa_g ~ u_g sigma
        q_new = u.conj().repeat_interleave(g)[:, None] * qc  # (Hq, d+1)
        k_rows[i], k_rows[i + n] = sigma.real, sigma.imag
        q_rows[:, i], q_rows[:, i + n] = q_new.real, q_new.imag
    return q_rows, k_rows, (kept / total if total > 0 else 1.0)


def _choose_pairs(scores: torch.Tensor, rope_dim: int, shared) -> list[list[int]]:
    """The kept pairs of each source KV group: its own top-scoring ones, or the shared evenly spaced set
    (``shared``: True to choose it from ``scores``, or the pairs themselves)."""
    if shared is not False:
        pairs = shared_rope_pairs(scores, rope_dim)[0] if shared is True else list(shared)
        return [pairs] * scores.shape[0]
    return [sorted(scores[j].topk(rope_dim // 2).indices.tolist()) for j in range(scores.shape[0])]


def _kv_latent(wk, wv, nope_dims, moment, rank):
    """The top-R principal subspace of [K on the unrotated dims of every group; V] (module doc, step 2):
    ``(kv_down [R, d+1], up [n, R], energy kept)``, up's first rows being K's."""
    hkv = wk.shape[0]
    k_nope = torch.cat([wk[j, nope_dims[j]] for j in range(hkv)])  # (Hkv*(D-r), d+1)
    y = torch.cat([k_nope, wv])  # (Hkv*(2D-r), d+1)
    n_k = k_nope.shape[0]
    scale = torch.ones(y.shape[0], dtype=torch.float64)
    for rows in (slice(0, n_k), slice(n_k, None)):  # each block to unit energy
        energy = _row_energy(y[rows], moment).sum()
        if energy > 0:
            scale[rows] = energy.rsqrt()
    ys = y * scale[:, None]
    evals, evecs = torch.linalg.eigh(ys @ moment @ ys.T)  # ascending
    u = evecs[:, -rank:].flip(1)  # (n, R) the top principal directions
    energy_kept = evals[-rank:].clamp_min(0).sum().item() / max(evals.clamp_min(0).sum().item(), 1e-300)
    return u.T @ ys, u / scale[:, None], energy_kept


@torch.no_grad()
def latent_from_attention(
    attn,
    moment: torch.Tensor,
    rank: int,
    rope_dim: int,
    *,
    offset_weights=None,
    layer: int = 0,
    shared_rope: bool | list[int] = False,
):
    """A :class:`gqa.latent.LatentAttention` (float32; float64 for a float64 source) from ``attn`` (a
    :class:`gqa.GroupedQueryAttention` without QK-norm), its input moment ``[d+1, d+1]`` and optionally
    its heads' attention mass per offset ``[Hq, T]`` (step 4 of the module doc); ``shared_rope``: one
    rotated key head for all query heads (step 3; the layer then has ``n_kv_heads=1``), True to choose its
    pairs from this layer's scores or the pairs to keep (one stride for every layer of a model). Returns
    ``(latent_attention, LatentFit)``."""
    from gqa.latent import LatentAttention

    hq, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qk_norm = attn.q_norm is not None
    if qk_norm and shared_rope is not False:
        raise GQAUserError(NO_SHARED_QK_NORM)
    if attn.rope_theta is None:
        raise GQAUserError("a latent conversion needs a RoPE model; this attention has no RoPE")
    top = max_latent_rank(d, hkv, rope_dim)
    if not 1 <= rank <= top:
        raise GQAUserError(
            f"latent rank {rank} is out of range: use 1 to {top} (= {hkv} groups x (2 x {d} - {rope_dim}))"
        )
    moment = moment.double()
    half, g = d // 2, hq // hkv
    scores = rope_pair_scores(attn, moment)  # (Hkv, D/2)
    pairs = _choose_pairs(scores, rope_dim, shared_rope)
    kept = sum(scores[j, pairs[j]].sum().item() for j in range(hkv)) / max(scores.sum().item(), 1e-300)
    wq, wk, wv = _aug(attn.q_proj).view(hq, d, -1), _aug(attn.k_proj).view(hkv, d, -1), _aug(attn.v_proj)
    nope_dims = [_dims(p, half)[0] for p in pairs]
    rope_dims = [_dims(p, half)[1] for p in pairs]
    down, up, energy_kept = _kv_latent(wk, wv, nope_dims, moment, rank)
    rope_heads = hkv if shared_rope is False else 1
    new = LatentAttention(
        attn.d_model, hq, rope_heads, d, rank, rope_dim, rope_theta=attn.rope_theta,
        qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None, scale=attn.scale,
        qk_norm=qk_norm, norm_scale_fp32=qk_norm and attn.q_norm.scale_fp32, norm_eps=attn.q_norm.eps if qk_norm else 1e-6,
    )  # fmt: skip
    if attn.q_proj.weight.dtype == torch.float64:  # float64 sources (tests, references) stay exact
        new = new.double()
    nope = d - rope_dim
    merge_kept = 1.0
    if shared_rope is not False:
        q_rope, k_rope, merge_kept = _shared_rope(wq, wk, pairs[0], moment)
    else:
        q_rope = torch.stack([wq[h, rope_dims[h // g]] for h in range(hq)])  # (Hq, r, d+1)
        k_rope = torch.cat([wk[j, rope_dims[j]] for j in range(hkv)])  # (Hkv*r, d+1)
    if offset_weights is not None and not qk_norm:  # QK-norm: dropped (module doc, step 5)
        wq = _expected_rotation(wq, pairs, g, offset_weights, attn.rope_theta)
    q_nope = torch.stack([wq[h, nope_dims[h // g]] for h in range(hq)])  # (Hq, D-r, d+1)
    _set(new.q_proj, torch.cat([q_nope, q_rope], dim=1).reshape(hq * d, -1))
    _set(new.kv_down, down)
    _set(new.k_rope_proj, k_rope)
    n_k = hkv * nope
    k_up = up[:n_k].view(hkv, nope, rank).repeat_interleave(g, dim=0)  # (Hq, D-r, R): a head starts as its group
    v_up = up[n_k:].view(hkv, d, rank).repeat_interleave(g, dim=0)  # (Hq, D, R)
    new.k_up.weight.copy_(k_up.reshape(hq * nope, rank))
    new.v_up.weight.copy_(v_up.reshape(hq * d, rank))
    new.o_proj.weight.copy_(attn.o_proj.weight.detach().double())
    if attn.o_proj.bias is not None:
        new.o_proj.bias.copy_(attn.o_proj.bias.detach().double())
    new.rope_pairs.copy_(torch.tensor(pairs[:rope_heads], dtype=torch.long).view(rope_heads, rope_dim // 2))
    if qk_norm:  # each head's norm scales in its [nope | rope] order
        order = [nope_dims[j] + rope_dims[j] for j in range(hkv)]
        new.q_norm_weight.copy_(torch.stack([attn.q_norm.weight.detach()[order[h // g]] for h in range(hq)]))
        new.k_norm_weight.copy_(torch.stack([attn.k_norm.weight.detach()[order[j]] for j in range(hkv)]))
    return new, LatentFit(
        layer, rank, rope_dim, pairs[:rope_heads], round(kept, 6), round(energy_kept, 6), round(merge_kept, 6)
    )


def _expected_rotation(wq: torch.Tensor, pairs: list[list[int]], g: int, offset_weights, theta: float) -> torch.Tensor:
    """Query rows ``[Hq, D, d+1]`` with each unrotated pair replaced by E[R(theta Δ)] times it (module doc, step 3)."""
    from gqa.rope import rope_frequencies

    hq, d, _ = wq.shape
    half = d // 2
    w = offset_weights.double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)  # (Hq, T) a distribution over offsets per head
    angle = (
        torch.arange(w.shape[1], dtype=torch.float64)[:, None] * rope_frequencies(d, theta).double()[None]
    )  # (T, D/2)
    a, b = w @ angle.cos(), w @ angle.sin()  # (Hq, D/2)
    out = wq.clone()
    for h in range(hq):
        for i in set(range(half)) - set(pairs[h // g]):
            x1, x2 = wq[h, i], wq[h, i + half]
            out[h, i], out[h, i + half] = a[h, i] * x1 - b[h, i] * x2, b[h, i] * x1 + a[h, i] * x2
    return out


def _set(linear, w_aug: torch.Tensor) -> None:
    """Weight (and bias, where the layer has one) from an augmented ``[out, d+1]`` matrix."""
    linear.weight.copy_(w_aug[:, :-1])
    if linear.bias is not None:
        linear.bias.copy_(w_aug[:, -1])


@torch.no_grad()
def latent_model(model, stats: list, ranks: list[int], rope_dim: int, *, shared_rope: bool = False):
    """A latent copy of ``model`` (a :class:`gqa.GQAForCausalLM`) from its calibration statistics (one
    :class:`gqa.convert.calibrated.stats.LayerStats` per layer; with attention statistics, unrotated pairs
    take their expected rotation): layer i's attention from :func:`latent_from_attention` at
    ``ranks[i]``; every other module is ``model``'s own (shared, not copied: only attention is new).
    ``shared_rope``: one rotated key head per layer (the new config's ``n_kv_heads`` is then 1: in a latent
    model it counts the rotated key heads), the layout DeepSeek-V2 files hold.
    Returns ``(new_model, [LatentFit per layer])``."""
    import dataclasses

    from gqa.model import GQAForCausalLM

    cfg = model.config
    if len(ranks) != cfg.n_layers or len(stats) != cfg.n_layers:
        raise GQAUserError(f"give one latent rank per layer ({cfg.n_layers}), got {len(ranks)}")
    new_cfg = dataclasses.replace(
        cfg, latent_rank=list(ranks) if len(set(ranks)) > 1 else ranks[0], latent_rope_dim=rope_dim
    )
    if shared_rope:
        new_cfg = dataclasses.replace(new_cfg, n_kv_heads=1)
    with torch.device("meta"):
        new = GQAForCausalLM(new_cfg)
    new.embed, new.norm, new.lm_head = model.embed, model.norm, model.lm_head
    fits = []
    if shared_rope:  # one stride for the whole model: a DeepSeek-V2 file has one RoPE base
        layer_scores = [
            rope_pair_scores(old.attn, st.input_moment.double()).sum(0, keepdim=True)
            for old, st in zip(model.layers, stats, strict=True)
        ]
        total = sum(sc / sc.sum().clamp_min(1e-300) for sc in layer_scores)  # each layer's share counts alike
        shared_rope = shared_rope_pairs(total, rope_dim)[0]
    for i, (old, block) in enumerate(zip(model.layers, new.layers, strict=True)):
        for name in ("attn_norm", "mlp_norm", "mlp", "post_attn_norm", "post_mlp_norm"):
            setattr(block, name, getattr(old, name))
        st = stats[i]
        block.attn, fit = latent_from_attention(
            old.attn,
            st.input_moment,
            ranks[i],
            rope_dim,
            offset_weights=st.offset_weights,
            layer=i,
            shared_rope=shared_rope,
        )
        fits.append(fit)
    return new, fits


#: Candidate ranks of a per-layer budget (``--kv-latent R --kv-budget F``); each layer also may take R itself.
RANK_OPTIONS = (8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512)


def latent_rank_options(max_rank: int) -> list[int]:
    """The ranks a layer may take under a budget: :data:`RANK_OPTIONS` up to ``max_rank``, and ``max_rank``."""
    return sorted({r for r in RANK_OPTIONS if r < max_rank} | {max_rank})


@torch.no_grad()
def latent_error_curves(
    model, stats: list, max_rank: int, rope_dim: int, calib_ids: torch.Tensor, *, shared_rope=False, progress=False
):
    """Per layer, ``{rank: error}`` for every :func:`latent_rank_options` rank: the mean KL(original || model
    with only this layer made latent) per token on ``calib_ids`` ``[N, T]``, the currency of the KV-head
    budget (:func:`gqa.convert.calibrated.reduce.error_curves`). One eigendecomposition per layer and rank."""
    from gqa.progress import progress as progress_bar

    reference = torch.log_softmax(model(calib_ids).double(), -1)  # (N, T, V)
    options = latent_rank_options(max_rank)
    curves = []
    for i in progress_bar(range(len(model.layers)), desc="latent error curves", unit="layer", enabled=progress):
        block, st = model.layers[i], stats[i]
        attn, curve = block.attn, {}
        try:
            for rank in options:
                block.attn, _ = latent_from_attention(
                    attn,
                    st.input_moment,
                    rank,
                    rope_dim,
                    offset_weights=st.offset_weights,
                    layer=i,
                    shared_rope=shared_rope,
                )
                block.attn = block.attn.to(attn.q_proj.weight.dtype)
                logp = torch.log_softmax(model(calib_ids).double(), -1)
                curve[rank] = float((reference.exp() * (reference - logp)).sum(-1).mean())
        finally:
            block.attn = attn
        curves.append(curve)
    return curves


def choose_latent_ranks(curves: list[dict[int, float]], rope_values: int, max_values: int) -> list[int]:
    """Per-layer ranks minimising the summed error with ``sum(rank + rope_values) <= max_values`` cache values
    per token (the exact knapsack of the KV-head budget, over values instead of heads)."""
    from gqa.convert.calibrated.budget import choose_kv_heads

    by_values = [{rank + rope_values: err for rank, err in curve.items()} for curve in curves]
    least = sum(min(c) for c in by_values)
    if max_values < least:
        raise GQAUserError(
            f"the budget allows {max_values} cache values per token but the smallest ranks take {least}; raise "
            "--kv-budget or lower --latent-rope-dim"
        )
    return [v - rope_values for v in choose_kv_heads(by_values, max_values)]
