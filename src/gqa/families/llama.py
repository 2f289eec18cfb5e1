"""Llama blocks: the conversion weight map of separate q/k/v/o projections (llama, mistral, qwen2, gemma,
granite, olmo) and what gqa needs to run the Llama-block families (llama, mistral, qwen2, qwen3, DeciLM).

Conversion: ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` with optional biases: q/k/v biases when
``attention_bias`` is set (always for qwen2), an o bias when ``attention_bias`` is set except qwen2.

Running: :func:`weight_map` (gqa parameter name -> transformers tensor name), :func:`config_from_hf`
(transformers config.json -> :class:`~gqa.model.config.GQAConfig` keyword arguments), :func:`config_from_gguf`
(a checked GGUF header -> the same) and :func:`gguf_tensor_map` (gqa name -> llama.cpp tensor name).
"""

from __future__ import annotations

from gqa.errors import GQAUserError
from gqa.families.base import KV_ROWS, O_COLS, Q_ROWS, SHARED, AttentionShape, Role
from gqa.formats.spec import CheckpointSpec, flag, positive_float, required, token_id
from gqa.model.config import check_int

NAME = "llama"


def qkvo_map(config: dict, layer: int, *, qkv_bias: bool, o_bias: bool) -> dict[str, Role]:
    p = f"model.layers.{layer}.self_attn."
    m = {p + "q_proj.weight": Q_ROWS, p + "k_proj.weight": KV_ROWS, p + "v_proj.weight": KV_ROWS}
    m[p + "o_proj.weight"] = O_COLS
    if qkv_bias:
        m |= {p + "q_proj.bias": Q_ROWS, p + "k_proj.bias": KV_ROWS, p + "v_proj.bias": KV_ROWS}
    if o_bias:
        m[p + "o_proj.bias"] = SHARED  # indexed by model dim, not by head
    return m


def attention_map(config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]:
    bias = bool(config.get("attention_bias", False))
    if config["model_type"] == "qwen2":
        return qkvo_map(config, layer, qkv_bias=True, o_bias=False)
    return qkvo_map(config, layer, qkv_bias=bias, o_bias=bias)


# ------------------------------------------------------------------------------------------------
# running: the runnable weight map and the config mappings


def weight_map(config) -> dict[str, str]:
    """gqa parameter name -> transformers tensor name, for every tensor of a Llama-block model."""
    m = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        m[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        m[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        for p in ("q", "k", "v", "o"):
            m[ours + f"attn.{p}_proj.weight"] = hf + f"self_attn.{p}_proj.weight"
        if config.qkv_bias:
            for p in ("q", "k", "v"):
                m[ours + f"attn.{p}_proj.bias"] = hf + f"self_attn.{p}_proj.bias"
        if config.o_bias:
            m[ours + "attn.o_proj.bias"] = hf + "self_attn.o_proj.bias"
        if config.qk_norm:
            m[ours + "attn.q_norm.weight"] = hf + "self_attn.q_norm.weight"
            m[ours + "attn.k_norm.weight"] = hf + "self_attn.k_norm.weight"
        for p in ("gate", "up", "down"):
            m[ours + f"mlp.{p}_proj.weight"] = hf + f"mlp.{p}_proj.weight"
            if config.mlp_bias:
                m[ours + f"mlp.{p}_proj.bias"] = hf + f"mlp.{p}_proj.bias"
    return m


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise GQAUserError(f"rope_parameters must be an object, got {params!r}; fix config.json")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise GQAUserError(
            f"RoPE type {rope_type!r} is not supported yet; gqa models use plain RoPE (rope_type 'default')"
        )
    return positive_float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta")


def config_from_hf(cfg: dict, spec: CheckpointSpec) -> dict:
    """:class:`~gqa.model.config.GQAConfig` keyword arguments of a llama / mistral / qwen2 / qwen3
    ``config.json`` whose shape ``spec`` has checked (heads, layers, head_dim)."""
    mt = cfg.get("model_type")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise GQAUserError(f"hidden_act {act!r} is not supported; gqa's decoder uses SwiGLU with silu")
    kv = list(spec.kv_heads)
    attention_bias = flag(cfg, "attention_bias")
    sliding = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not flag(cfg, "use_sliding_window"):
        sliding = None
    if sliding is not None:
        sliding = check_int("sliding_window", sliding, field="sliding_window")
    return dict(
        vocab_size=check_int("vocab_size", required(cfg, "vocab_size"), field="vocab_size"),
        d_model=check_int("d_model", required(cfg, "hidden_size"), field="hidden_size"),
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=kv if cfg.get("per_layer_config") is not None or len(set(kv)) > 1 else kv[0],
        head_dim=spec.head_dim if cfg.get("head_dim") is not None else None,
        ffn_dim=check_int("ffn_dim", required(cfg, "intermediate_size"), field="intermediate_size"),
        rope_theta=rope_theta(cfg),
        norm_eps=positive_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_seq_len=spec.max_context or 4096,
        tie_embeddings=flag(cfg, "tie_word_embeddings"),
        qkv_bias=True if mt == "qwen2" else attention_bias,
        o_bias=False if mt == "qwen2" else attention_bias,
        mlp_bias=flag(cfg, "mlp_bias"),
        qk_norm=mt == "qwen3",
        sliding_window=sliding,
        bos_token_id=token_id(cfg, "bos_token_id"),
        eos_token_id=token_id(cfg, "eos_token_id"),
        pad_token_id=token_id(cfg, "pad_token_id"),
    )


def config_from_gguf(h, spec: CheckpointSpec) -> dict:
    """:class:`~gqa.model.config.GQAConfig` keyword arguments of a checked ``llama`` / ``deci`` GGUF header
    (:class:`gqa.formats.gguf.GGUFHeader`), or a one-line error for what gqa models do not have."""
    name = h.path.name
    for what, values in (("attention.head_count", h.heads), ("feed_forward_length", h.ffn_dims)):
        if len(set(values)) > 1:
            raise GQAUserError(f"{name} varies {what} per layer; gqa models vary only the KV heads")
    if 0 in h.kv_heads:
        raise GQAUserError(f"{name} has attention-free layers (head_count_kv 0); gqa cannot load them")
    kv = list(h.kv_heads)
    token = {k: h.field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return dict(
        vocab_size=h.vocab_size,
        d_model=h.d_model,
        n_layers=h.n_layers,
        n_heads=h.heads[0],
        n_kv_heads=kv if len(set(kv)) > 1 else kv[0],
        head_dim=h.head_dim,
        ffn_dim=h.ffn_dims[0],
        rope_theta=10000.0 if h.rope_theta is None else h.rope_theta,
        norm_eps=1e-5 if h.norm_eps is None else h.norm_eps,
        max_seq_len=h.context or 4096,
        tie_embeddings="output.weight" not in h.tensors,
        bos_token_id=token["bos"],
        eos_token_id=token["eos"],
        pad_token_id=token["padding"],
    )


#: gqa name (after ``layers.{i}.``) -> llama.cpp name (after ``blk.{i}.``) of a Llama block, in file order.
GGUF_LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_map(config) -> dict[str, str]:
    """gqa parameter name -> llama.cpp tensor name for every tensor of a Llama-block model, in file order
    (``output.weight`` is absent when the embeddings are tied, for llama.cpp and transformers alike)."""
    m = {"embed.weight": "token_embd.weight"}
    for i in range(config.n_layers):
        m |= {f"layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in GGUF_LAYER_TENSORS.items()}
    m["norm.weight"] = "output_norm.weight"
    if not config.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    return m

