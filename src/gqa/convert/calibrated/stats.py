"""Calibration statistics: what each layer's attention sees on real text.

:func:`collect_statistics` runs a :class:`gqa.GQAForCausalLM` over calibration tokens and keeps, per
layer, the second moment of the attention input (from which every head's pre-RoPE K, V and Q
second and cross moments follow exactly, since projections are linear), a few sequences of raw
attention inputs (to *measure* a converted layer's output error), and, when asked, attention
statistics: each query head's distribution of attention over relative offsets, and the second
moment of the attention-averaged input that each old KV head's values are read through.

Inputs are augmented with a constant 1 (``x~ = [x; 1]``, ``d + 1`` features) so projection biases
are handled by the same algebra as weights: a head's augmented weight is ``[W | b]``.

Head mapping: query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.rope import apply_rope, rope_cos_sin

__all__ = ["LayerStats", "collect_statistics", "calibration_ids"]


@dataclass
class LayerStats:
    """Calibration statistics of one layer (float64 unless stated).

    input_moment: ``[d+1, d+1]``, E[x~ x~^T] over calibration tokens (x = the attention input, after
        the layer's input norm).
    residual_energy: E[||h||^2] of the residual stream entering the layer (the scale errors are
        measured against).
    samples: ``[S, T, d]`` float32, the attention inputs of the first S calibration sequences.
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


def calibration_ids(text_or_ids, tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the calibration text as ``[n_tokens // seq_len, seq_len]`` ids.

    Raises a one-line ValueError when the text is shorter than ``n_tokens``.
    """
    if n_tokens < seq_len:
        raise ValueError(f"--calib-tokens {n_tokens} is below one sequence of {seq_len} tokens; raise it")
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("calibration text needs the model's tokenizer")
        from gqa.data import encode

        ids = encode(tokenizer, text_or_ids)
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).flatten()
    if ids.numel() < n_tokens:
        raise ValueError(
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
def _attention_stats(attn, x: torch.Tensor, positions: torch.Tensor):
    """Attention probabilities of one batch, recomputed from the layer's own projections.

    x [B, T, d] -> (offset mass [Hq, T] summed over queries, attended moment [Hkv, d+1, d+1] summed,
    number of queries). Causal: a query at p sees keys 0..p.
    """
    b, t, _ = x.shape
    hq, hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, hq, dh).transpose(1, 2)  # (B, Hq, T, D)
    k = attn.k_proj(x).view(b, t, hkv, dh).transpose(1, 2)  # (B, Hkv, T, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope_theta is not None:
        cos, sin = rope_cos_sin(positions, attn.inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    g = hq // hkv
    k = k.repeat_interleave(g, dim=1)  # (B, Hq, T, D): calibration only, never a hot path
    scores = (q.float() @ k.float().transpose(-1, -2)) / dh**0.5  # (B, Hq, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, Hq, T, T)
    # Offset p - s of every (query p, key s) pair; mass per offset via scatter over the flattened pairs.
    offsets = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).flatten()  # (T*T,)
    mass = torch.zeros(hq, t, dtype=torch.float64)
    mass.index_add_(1, offsets, probs.sum(0).reshape(hq, t * t).to(torch.float64).clone())
    xa = _augment(x)  # (B, T, d+1)
    attended = probs.to(torch.float64) @ xa[:, None]  # (B, Hq, T, d+1)
    per_head = torch.einsum("bhti,bhtj->hij", attended, attended)  # (Hq, d+1, d+1)
    moment = per_head.view(hkv, g, *per_head.shape[1:]).mean(1)  # (Hkv, d+1, d+1)
    return mass, moment, b * t


@torch.no_grad()
def collect_statistics(
    model,
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
    sample_sequences: int = 4,
    attention_sequences: int = 0,
    progress: bool = True,
) -> list[LayerStats]:
    """Run ``model`` (a :class:`gqa.GQAForCausalLM`) over ``ids`` [N, T] and return one
    :class:`LayerStats` per layer.

    sample_sequences: how many sequences of raw attention inputs to keep for measured errors.
    attention_sequences: on how many sequences to also gather attention statistics (offset
        distribution and attended input moments, used by ``merge="fit"``); they cost O(T^2) each.
    """
    from tqdm.auto import tqdm

    layers = model.layers
    n_layers = len(layers)
    d = model.config.d_model
    moments = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in range(n_layers)]
    energy = [0.0] * n_layers
    samples: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    offset_mass: list[torch.Tensor | None] = [None] * n_layers
    attended: list[torch.Tensor | None] = [None] * n_layers
    attended_count = [0] * n_layers
    state = {"seq0": 0, "positions": None}

    def make_hooks(i: int):
        block = layers[i]

        def block_pre(module, args):
            h = args[0]  # (B, T, d) residual stream entering the block
            energy[i] += h.to(torch.float64).pow(2).sum().item()

        def attn_pre(module, args, kwargs):
            x = args[0]  # (B, T, d) attention input (after the input norm)
            xa = _augment(x).reshape(-1, d + 1)  # (B*T, d+1)
            moments[i].add_(xa.T @ xa)
            seq0 = state["seq0"]
            keep = max(0, min(x.shape[0], sample_sequences - seq0))
            if keep:
                samples[i].append(x[:keep].detach().float().cpu())
            use = max(0, min(x.shape[0], attention_sequences - seq0))
            if use:
                mass, mom, n = _attention_stats(module, x[:use], state["positions"])
                offset_mass[i] = mass if offset_mass[i] is None else offset_mass[i] + mass
                attended[i] = mom if attended[i] is None else attended[i] + mom
                attended_count[i] += n

        return block.register_forward_pre_hook(block_pre), block.attn.register_forward_pre_hook(
            attn_pre, with_kwargs=True
        )

    handles = [h for i in range(n_layers) for h in make_hooks(i)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_seq, t = ids.shape
    state["positions"] = torch.arange(t, device=device)
    bar = tqdm(total=n_seq * t, unit="tok", unit_scale=True, desc="calibrate", disable=not progress)
    try:
        for start in range(0, n_seq, batch_size):
            state["seq0"] = start
            batch = ids[start : start + batch_size].to(device)
            model(batch)
            bar.update(batch.numel())
    finally:
        bar.close()
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
                input_moment=moments[i] / n_tok,
                residual_energy=energy[i] / n_tok,
                samples=torch.cat(samples[i]) if samples[i] else torch.zeros(0, t, d),
                offset_weights=off,
                attended_moment=att,
                tokens=n_tok,
            )
        )
    return out
