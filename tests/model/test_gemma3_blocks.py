"""Gemma-3's blocks in gqa's one decoder: GeGLU, sandwich norms, scaled embeddings, QK-norm, its softmax
scale, and sliding-window layers (their own RoPE base, ring-buffer caches) between global ones.

Parity is against transformers' ``Gemma3ForCausalLM`` on a tiny random model in float64; cached decoding
(ring buffers for the sliding layers) equals the uncached forward, ragged batches equal each sequence alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import gqa
from gqa import GQAConfig, GQAForCausalLM
from gqa.cache import KVCache, RingKVCache

WINDOW = 4
TYPES = ["sliding", "sliding", "global", "sliding", "sliding", "global"]


def tiny_gemma3(n_kv: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=len(TYPES), num_attention_heads=4,
        num_key_value_heads=n_kv, head_dim=16, sliding_window=WINDOW, max_position_embeddings=64,
        query_pre_attn_scalar=12, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=[f"{'sliding' if t == 'sliding' else 'full'}_attention" for t in TYPES],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        attn_implementation="sdpa",  # eager takes its softmax in fp32 even in float64
    )  # fmt: skip
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm scales, so the (1 + w) offset is exercised
                p.normal_(0.0, 0.3)
    return model


def gqa_from_gemma3(hf) -> GQAForCausalLM:
    """The same network as gqa modules: every tensor copied by name, norm scales stored as 1 + w."""
    c = hf.config
    config = GQAConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, ffn_dim=c.intermediate_size, rope_theta=1e6,
        rope_local_theta=1e4, norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings, tie_embeddings=True,
        qk_norm=True, sliding_window=c.sliding_window, layer_types=TYPES, hidden_act="gelu_tanh",
        embed_scale=float(hf.model.embed_tokens.embed_scale), sandwich_norm=True, norm_scale_fp32=True,
        attn_scale=c.query_pre_attn_scalar**-0.5,
    )  # fmt: skip
    names = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
             "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}  # fmt: skip
    src = hf.state_dict()
    ours = GQAForCausalLM(config).to(src["model.norm.weight"].dtype)  # loading float64 into fp32 would round
    state = {"embed.weight": src["model.embed_tokens.weight"], "norm.weight": 1 + src["model.norm.weight"]}
    for i in range(config.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for mine, theirs in names.items():
            state[p + mine + ".weight"] = 1 + src[q + theirs + ".weight"]
        for x in "qkvo":
            state[p + f"attn.{x}_proj.weight"] = src[q + f"self_attn.{x}_proj.weight"]
        for x in "qk":
            state[p + f"attn.{x}_norm.weight"] = 1 + src[q + f"self_attn.{x}_norm.weight"]
        for x in ("gate", "up", "down"):
            state[p + f"mlp.{x}_proj.weight"] = src[q + f"mlp.{x}_proj.weight"]
    state["lm_head.weight"] = state["embed.weight"]
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def _gemma_norm_in_input_dtype(self, x):
    """Gemma3RMSNorm.forward without its cast to fp32, so a float64 reference stays float64 throughout."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


@pytest.mark.parametrize("n_kv", [1, 2], ids=["MQA", "GQA"])
def test_logits_match_transformers_in_float64(n_kv, monkeypatch):
    monkeypatch.setattr(transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm, "forward", _gemma_norm_in_input_dtype)
    hf = tiny_gemma3(n_kv).double()
    ours = gqa_from_gemma3(hf).double()
    ids = torch.randint(0, 97, (2, 13))  # longer than the window, so the sliding layers differ from global ones
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)


def test_greedy_tokens_match_transformers_generate():
    hf = tiny_gemma3(1, seed=3)
    ours = gqa_from_gemma3(hf)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        got = ours.generate_greedy(ids, 12)
    assert got.tolist() == ref.tolist()


def _stepwise(model, ids, chunks):
    """Logits of ``ids`` fed through one cache in chunks of the given sizes: [B, T, vocab]."""
    cache = model.make_cache(ids.shape[0], 32)
    outs, at = [], 0
    for n in chunks:
        outs.append(model(ids[:, at : at + n], cache=cache))
        at += n
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("chunks", [[1] * 11, [7, 1, 1, 1, 1], [3, 5, 2, 1], [11]], ids=["tokens", "prefill", "mixed", "one"])
def test_ring_cached_decoding_equals_uncached(chunks):
    model = gqa_from_gemma3(tiny_gemma3(2, seed=1)).double()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        full = model(ids)
        got, cache = _stepwise(model, ids, chunks)
    torch.testing.assert_close(got, full, atol=1e-10, rtol=1e-9)
    kinds = [type(c) for c in cache.layers]
    assert kinds == [RingKVCache if t == "sliding" else KVCache for t in TYPES]
    assert all(c.length == 11 for c in cache.layers)


def test_ragged_batch_equals_each_sequence_alone():
    model = gqa_from_gemma3(tiny_gemma3(2, seed=2))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15, 16]]
    batch = gqa.generate(model, prompts, max_new_tokens=9, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = gqa.generate(model, [p], max_new_tokens=9, eos_token_id=None)
        assert batch.tokens[i] == alone.tokens[0]


def test_sliding_layers_hold_only_their_window():
    model = gqa_from_gemma3(tiny_gemma3(2))
    cfg = model.config
    cache = model.make_cache(3, 64, dtype=torch.bfloat16)
    per_token = 2 * 2 * cfg.resolved_head_dim * 2  # K and V, 2 KV heads, bf16
    n_global, n_sliding = TYPES.count("global"), TYPES.count("sliding")
    assert cache.nbytes == 3 * (n_global * 64 + n_sliding * WINDOW) * per_token
    assert cfg.kv_bytes(64, torch.bfloat16) == (n_global * 64 + n_sliding * WINDOW) * per_token
    assert cfg.kv_bytes(3, torch.bfloat16) == len(TYPES) * 3 * per_token  # shorter than the window: every token


def test_ring_cache_refuses_past_its_sequence_limit():
    ring = RingKVCache(1, 1, 4, 8, max_seq_len=6)
    ring.update(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    ring.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    with pytest.raises(gqa.GQAUserError, match="beyond the cache"):
        ring.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))


def test_layer_types_are_validated():
    with pytest.raises(gqa.GQAUserError, match="sliding_window is not set"):
        GQAConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8, layer_types=["sliding", "global"])
    with pytest.raises(gqa.GQAUserError, match="layer_types must list 2"):
        GQAConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8, layer_types=["global"])
    with pytest.raises(gqa.GQAUserError, match="hidden_act"):
        GQAConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8, hidden_act="relu")
