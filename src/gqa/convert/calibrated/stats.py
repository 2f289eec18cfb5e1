"""Calibration statistics: what each layer's attention sees on real text, captured with hooks.

:func:`collect_statistics` runs a :class:`gqa.GQAForCausalLM`'s own forward over calibration tokens
with forward hooks on its modules (no forward of its own) and keeps, per layer, the second moment of
the attention input (from which every head's pre-RoPE K, V and Q second and cross moments follow
exactly, since projections are linear), one batch of raw attention inputs together with the exact
extra arguments the model passed to the attention module (to *measure* a converted layer's output
error by calling the converted module the same way), and, when asked, attention statistics: each
query head's distribution of attention over relative offsets, and the second moment of the
attention-averaged input that each old KV head's values are read through. Those come from the q and
k the model's own projections produced (hooks on ``q_proj`` / ``k_proj``), through the module's own
q/k norms and RoPE frequencies, and the fp64 reference attention (:func:`gqa.reference_attention`).

Inputs are augmented with a constant 1 (``x~ = [x; 1]``, ``d + 1`` features) so projection biases
are handled by the same algebra as weights: a head's augmented weight is ``[W | b]``.

Head mapping: query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError

__all__ = ["LayerStats", "collect_statistics", "calibration_ids", "run_attention"]


@dataclass
class LayerStats:
    """Calibration statistics of one layer (float64 unless stated).

    input_moment: ``[d+1, d+1]``, E[x~ x~^T] over calibration tokens (x = the attention input, after
        the layer's input norm).
    residual_energy: E[||h||^2] of the residual stream entering the layer (the scale errors are
        measured against).
    samples: ``[S, T, d]`` float32, the attention inputs of the first calibration batch.
    call: ``(args, kwargs)`` the model passed to the attention module after x for that batch
        (positions, cache, mask, RoPE tables, ...), replayed by :func:`run_attention`.
    offset_weights: ``[Hq, T]`` or None, mean attention mass a query head puts at offset p - s.
    attended_moment: ``[Hkv, d+1, d+1]`` or None, E[x̄ x̄^T] with x̄ = sum_s a(p, s) x~_s the
        attention-averaged input, averaged over the query heads that read each KV head.
    tokens: calibration tokens the moments average over.
    """

    input_moment: torch.Tensor
    residual_energy: float
    samples: torch.Tensor
    offset_weights: torch.Tensor | None
    attended_moment: torch.Tensor | None
    tokens: int
    call: tuple = ((), {})


def run_attention(attn, x: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``attn`` applied to ``x`` [S, T, d] exactly as the model's forward called the original module."""
    args, kwargs = stats.call
    return attn(x, *args, **kwargs)


def calibration_ids(text_or_ids, tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the calibration text as ``[n_tokens // seq_len, seq_len]`` ids.

    Raises a one-line ValueError when the text is shorter than ``n_tokens``.
    """
    if n_tokens < seq_len:
        raise GQAUserError(f"--calib-tokens {n_tokens} is below one sequence of {seq_len} tokens; raise it")
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise GQAUserError("calibration text needs the model's tokenizer; pass a folder or GGUF that has one")
        from gqa.data import encode

        # Encode a prefix long enough for n_tokens (plus a margin, so the last wanted tokens are not cut
        # mid-word), doubling it while the text has more characters per token than guessed: a corpus may
        # be far longer than needed.
        chars = 8 * (n_tokens + 64)
        while True:
            ids = encode(tokenizer, text_or_ids[:chars])
            if chars >= len(text_or_ids) or ids.numel() >= n_tokens + 64:
                break
            chars *= 2
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).flatten()
    if ids.numel() < n_tokens:
        raise GQAUserError(
            f"the calibration text has {ids.numel():,} tokens, fewer than --calib-tokens {n_tokens:,}; "
            "give a longer text or lower --calib-tokens"
        )
    n_seq = n_tokens // seq_len
    return ids[: n_seq * seq_len].view(n_seq, seq_len)  # (N, T)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d+1] float64 with a trailing 1 (the bias feature)."""
    x = x.to(torch.float64)
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


@torch.no_grad()
def _attention_stats(attn, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """Attention statistics of one batch from the projections the model computed.

    x [B, T, d] attention input; q [B, T, Hq*D], k [B, T, Hkv*D] the outputs of ``attn.q_proj`` /
    ``attn.k_proj`` (captured by hooks) -> (offset mass [Hq, T] summed over queries, attended moment
    [Hkv, d+1, d+1] summed, number of queries). Causal: a query at p sees keys 0..p.
    """
    from gqa import masks
    from gqa.reference import reference_attention
    from gqa.rope import apply_rope, rope_cos_sin

    b, t, _ = x.shape
    hq, hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = q.view(b, t, hq, dh).transpose(1, 2)  # (B, Hq, T, D)
    k = k.view(b, t, hkv, dh).transpose(1, 2)  # (B, Hkv, T, D)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if getattr(attn, "rope_theta", None) is not None:
        cos, sin = rope_cos_sin(torch.arange(t, device=x.device), attn.inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    xa = _augment(x)  # (B, T, d+1)
    values = xa[:, None].expand(b, hkv, t, xa.shape[-1])  # (B, Hkv, T, d+1): attention averages the inputs
    attended, probs = reference_attention(q, k, values, mask=masks.causal(), return_weights=True)
    # attended (B, Hq, T, d+1), probs (B, Hq, T, T). Offset p - s of every (query p, key s) pair.
    offsets = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).flatten()  # (T*T,)
    mass = torch.zeros(hq, t, dtype=torch.float64)
    mass.index_add_(1, offsets, probs.sum(0).reshape(hq, t * t).cpu().clone())
    per_head = torch.einsum("bhti,bhtj->hij", attended, attended).cpu()  # (Hq, d+1, d+1)
    g = hq // hkv
    moment = per_head.view(hkv, g, *per_head.shape[1:]).mean(1)  # (Hkv, d+1, d+1)
    return mass, moment, b * t


@torch.no_grad()
def collect_statistics(
    model,
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
    attention_sequences: int = 0,
    progress: bool = True,
) -> list[LayerStats]:
    """Run ``model`` (a :class:`gqa.GQAForCausalLM`) over ``ids`` [N, T] and return one
    :class:`LayerStats` per layer.

    The first batch's attention inputs are kept as samples (to measure converted layers).
    attention_sequences: on how many sequences to also gather attention statistics (offset
        distribution and attended input moments, used by ``merge="fit"``); they cost O(T^2) each.
    """
    from gqa.progress import progress as progress_bar

    layers = model.layers
    n_layers = len(layers)
    d = model.config.d_model
    moments = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in range(n_layers)]
    energy = [0.0] * n_layers
    samples: list[torch.Tensor | None] = [None] * n_layers
    calls: list[tuple] = [((), {})] * n_layers
    offset_mass: list[torch.Tensor | None] = [None] * n_layers
    attended: list[torch.Tensor | None] = [None] * n_layers
    attended_count = [0] * n_layers
    state = {"seq0": 0}

    def make_hooks(i: int):
        block, attn = layers[i], layers[i].attn
        seen: dict = {}

        def block_pre(module, args):
            h = args[0]  # (B, T, d) residual stream entering the block
            energy[i] += h.to(torch.float64).pow(2).sum().item()

        def attn_pre(module, args, kwargs):
            if state["seq0"] == 0:  # the extra arguments the model passes, to replay on the samples
                calls[i] = (tuple(args[1:]), dict(kwargs))

        def q_post(module, args, output):
            seen["q"] = output  # (B, T, Hq*D)

        def k_post(module, args, output):
            x = args[0]  # (B, T, d) attention input (after the input norm)
            xa = _augment(x).reshape(-1, d + 1)  # (B*T, d+1)
            moments[i].add_(xa.T.cpu() @ xa.cpu())
            if state["seq0"] == 0:
                samples[i] = x.detach().float().cpu()
            use = max(0, min(x.shape[0], attention_sequences - state["seq0"]))
            if use:
                mass, mom, n = _attention_stats(attn, x[:use], seen.pop("q")[:use], output[:use])
                offset_mass[i] = mass if offset_mass[i] is None else offset_mass[i] + mass
                attended[i] = mom if attended[i] is None else attended[i] + mom
                attended_count[i] += n

        return (
            block.register_forward_pre_hook(block_pre),
            attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            attn.q_proj.register_forward_hook(q_post),
            attn.k_proj.register_forward_hook(k_post),
        )

    handles = [h for i in range(n_layers) for h in make_hooks(i)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_seq, t = ids.shape
    try:
        with progress_bar(total=n_seq * t, unit="tok", unit_scale=True, desc="calibrate", enabled=progress) as bar:
            for start in range(0, n_seq, batch_size):
                state["seq0"] = start
                batch = ids[start : start + batch_size].to(device)
                model(batch)
                bar.update(batch.numel())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n_tok = n_seq * t
    out = []
    for i in range(n_layers):
        off = None
        if offset_mass[i] is not None:
            off = offset_mass[i] / offset_mass[i].sum(-1, keepdim=True)  # (Hq, T) a distribution per head
        att = attended[i] / attended_count[i] if attended[i] is not None else None
        out.append(
            LayerStats(
                input_moment=moments[i].div_(n_tok),  # in place: a 7B model's moments are ~4 GiB in all
                residual_energy=energy[i] / n_tok,
                samples=samples[i] if samples[i] is not None else torch.zeros(0, t, d),
                offset_weights=off,
                attended_moment=att,
                tokens=n_tok,
                call=calls[i],
            )
        )
    return out
