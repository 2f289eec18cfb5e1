"""Gemma-3 text models (``gemma3_text``, ``Gemma3ForCausalLM``; llama.cpp architecture ``gemma3``): what gqa
needs to run them, from a transformers folder or a GGUF file, and to write them back.

What differs from a Llama block, each a :class:`~gqa.model.config.GQAConfig` field: GeGLU (``gelu_tanh``),
QK-norm, norms after attention and the MLP too (``sandwich_norm``), embeddings scaled by sqrt(d_model),
a softmax scale from ``query_pre_attn_scalar``, and sliding-window layers (5 of every 6 in the released
models) with their own RoPE base between global ones.

Norm scales: transformers stores ``w`` and multiplies by ``1 + w``; llama.cpp's GGUF files and gqa store
``1 + w`` (:func:`from_hf` / :func:`to_hf` convert on a folder's read and write; GGUF tensors are used as
they are). Q/K rows are not RoPE-permuted in Gemma GGUF files.
"""

from __future__ import annotations

import math

import torch

from gqa.errors import GQAUserError
from gqa.formats.spec import CheckpointSpec, positive_float, required, token_id
from gqa.model.config import GQAConfig, check_int

#: llama.cpp's gemma3 loader: every 6th layer global, the others sliding with RoPE base 10,000.
GGUF_GLOBAL_EVERY = 6
GGUF_LOCAL_ROPE_THETA = 10000.0

#: gqa norm name (after ``layers.{i}.``) -> transformers name (after ``model.layers.{i}.``), and llama.cpp's.
_NORMS = {
    "attn_norm": ("input_layernorm", "attn_norm"),
    "post_attn_norm": ("post_attention_layernorm", "post_attention_norm"),
    "mlp_norm": ("pre_feedforward_layernorm", "ffn_norm"),
    "post_mlp_norm": ("post_feedforward_layernorm", "post_ffw_norm"),
}
_LINEAR = {
    "attn.q_proj": ("self_attn.q_proj", "attn_q"),
    "attn.k_proj": ("self_attn.k_proj", "attn_k"),
    "attn.v_proj": ("self_attn.v_proj", "attn_v"),
    "attn.o_proj": ("self_attn.o_proj", "attn_output"),
    "attn.q_norm": ("self_attn.q_norm", "attn_q_norm"),
    "attn.k_norm": ("self_attn.k_norm", "attn_k_norm"),
    "mlp.gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "mlp.up_proj": ("mlp.up_proj", "ffn_up"),
    "mlp.down_proj": ("mlp.down_proj", "ffn_down"),
}
#: per-layer GGUF tensors beyond a Llama block's, with their sizes (see Family.gguf_layer_extras)
GGUF_LAYER_EXTRAS = (
    ("attn_q_norm.weight", "head"),
    ("attn_k_norm.weight", "head"),
    ("post_attention_norm.weight", "model"),
    ("post_ffw_norm.weight", "model"),
)


def _layer_names(config, which: int) -> dict[str, str]:
    """gqa name -> the other format's name (0: transformers, 1: llama.cpp) of every per-layer tensor."""
    prefix = ("model.layers.{i}.", "blk.{i}.")[which]
    m = {}
    for i in range(config.n_layers):
        for ours, names in (_NORMS | _LINEAR).items():
            m[f"layers.{i}.{ours}.weight"] = prefix.format(i=i) + names[which] + ".weight"
    return m


def weight_map(config) -> dict[str, str]:
    """gqa parameter name -> transformers tensor name (the embeddings are tied, as in every Gemma-3)."""
    return {"embed.weight": "model.embed_tokens.weight", **_layer_names(config, 0), "norm.weight": "model.norm.weight"}


def gguf_tensor_map(config) -> dict[str, str]:
    """gqa parameter name -> llama.cpp tensor name, in file order."""
    m = {"embed.weight": "token_embd.weight", **_layer_names(config, 1), "norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    return m


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def from_hf(name: str, t: torch.Tensor) -> torch.Tensor:
    """A transformers tensor as gqa holds it: norm scales ``w`` become ``1 + w``."""
    return 1 + t if _is_norm(name) else t


def to_hf(name: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`from_hf`."""
    return t - 1 if _is_norm(name) else t


def saves(config: GQAConfig) -> bool:
    """A gqa config is a Gemma-3 when it has Gemma's norms after attention and the MLP."""
    return bool(config.sandwich_norm)


# ------------------------------------------------------------------------------------------------
# config mappings


def _gemma_fields(d_model: int, head_dim: int, query_scalar: float) -> dict:
    return dict(
        hidden_act="gelu_tanh",
        embed_scale=math.sqrt(d_model),
        sandwich_norm=True,
        norm_scale_fp32=True,
        qk_norm=True,
        attn_scale=query_scalar**-0.5,
        head_dim=head_dim,
    )


def _layer_types(cfg: dict, n_layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:  # older configs: every sliding_window_pattern-th layer global
        every = check_int("sliding_window_pattern", cfg.get("sliding_window_pattern", GGUF_GLOBAL_EVERY))
        return ["global" if (i + 1) % every == 0 else "sliding" for i in range(n_layers)]
    names = {"full_attention": "global", "sliding_attention": "sliding"}
    if not isinstance(types, list) or len(types) != n_layers or any(t not in names for t in types):
        raise GQAUserError(
            f"layer_types must list {n_layers} entries of full_attention / sliding_attention; fix config.json"
        )
    return [names[t] for t in types]


def _rope_thetas(cfg: dict) -> tuple[float, float]:
    """(global, sliding) RoPE bases: transformers 5's ``rope_parameters`` per layer type, or the released
    configs' ``rope_theta`` / ``rope_local_base_freq``; scaled RoPE (the 4B+ models) is refused."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        kinds = {k: params.get(k) or {} for k in ("full_attention", "sliding_attention")}
    else:
        scaling = params if isinstance(params, dict) else cfg.get("rope_scaling") or {}
        kinds = {
            "full_attention": {"rope_theta": cfg.get("rope_theta", 1e6), **scaling},
            "sliding_attention": {"rope_theta": cfg.get("rope_local_base_freq", GGUF_LOCAL_ROPE_THETA)},
        }
    for kind, p in kinds.items():
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
            raise GQAUserError(f"{kind} RoPE {p!r} is not supported yet; gqa runs Gemma-3 with plain RoPE")
    return tuple(positive_float(kinds[k].get("rope_theta"), f"{k} rope_theta") for k in kinds)


def config_from_hf(cfg: dict, spec: CheckpointSpec) -> dict:
    """:class:`~gqa.model.config.GQAConfig` keyword arguments of a ``gemma3_text`` ``config.json``."""
    act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise GQAUserError(f"hidden_activation {act!r} is not supported; Gemma-3 uses gelu_pytorch_tanh")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(cap) is not None:
            raise GQAUserError(f"{cap} is set; gqa runs Gemma-3 without logit soft-capping (Gemma-2 has it)")
    global_theta, local_theta = _rope_thetas(cfg)
    d_model = check_int("d_model", required(cfg, "hidden_size"), field="hidden_size")
    kv = list(spec.kv_heads)
    return dict(
        vocab_size=check_int("vocab_size", required(cfg, "vocab_size"), field="vocab_size"),
        d_model=d_model,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=kv if len(set(kv)) > 1 else kv[0],
        ffn_dim=check_int("ffn_dim", required(cfg, "intermediate_size"), field="intermediate_size"),
        rope_theta=global_theta,
        rope_local_theta=local_theta,
        norm_eps=positive_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_seq_len=spec.max_context or 32768,
        tie_embeddings=True,
        sliding_window=check_int("sliding_window", required(cfg, "sliding_window"), field="sliding_window"),
        layer_types=_layer_types(cfg, spec.n_layers),
        bos_token_id=token_id(cfg, "bos_token_id"),
        eos_token_id=token_id(cfg, "eos_token_id"),
        pad_token_id=token_id(cfg, "pad_token_id"),
        **_gemma_fields(
            d_model,
            spec.head_dim,
            positive_float(cfg.get("query_pre_attn_scalar", spec.head_dim), "query_pre_attn_scalar"),
        ),
    )


def config_to_hf(config: GQAConfig) -> dict:
    """:class:`GQAConfig` -> a ``gemma3_text`` ``config.json`` dict."""
    _check_gemma(config)
    names = {"global": "full_attention", "sliding": "sliding_attention"}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads_per_layer[0],
        "head_dim": config.resolved_head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta or config.rope_theta},
        },
        "query_pre_attn_scalar": round(config.attn_scale**-2) if config.attn_scale else config.resolved_head_dim,
        "sliding_window": config.sliding_window,
        "layer_types": [names[t] for t in config.attention_kinds],
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    } | config.extra


def _check_gemma(config: GQAConfig) -> None:
    """What every Gemma-3 file says implicitly: tied embeddings, uniform KV heads, sqrt(d) embedding scale."""
    if config.is_variable:
        raise GQAUserError("Gemma-3 files hold one KV-head count for every layer; convert with --kv-heads N")
    if (
        not config.tie_embeddings
        or config.embed_scale is None
        or not config.qk_norm
        or config.hidden_act != "gelu_tanh"
    ):
        raise GQAUserError(
            "this model has Gemma-3's sandwich norms but not its other blocks; it cannot save as Gemma-3"
        )


def config_from_gguf(h, spec: CheckpointSpec) -> dict:
    """:class:`~gqa.model.config.GQAConfig` keyword arguments of a checked ``gemma3`` GGUF header: the layer
    pattern and the sliding layers' RoPE base are llama.cpp's (the file does not store them)."""
    if len(set(h.heads)) > 1 or len(set(h.kv_heads)) > 1 or len(set(h.ffn_dims)) > 1:
        raise GQAUserError(f"{h.path.name} varies heads or FFN widths per layer; Gemma-3 files do not")
    window = h.field("gemma3.attention.sliding_window")
    if window is None:
        raise GQAUserError(f"{h.path.name} has no gemma3.attention.sliding_window; re-export or re-download it")
    n = h.n_layers
    token = {k: h.field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return dict(
        vocab_size=h.vocab_size,
        d_model=h.d_model,
        n_layers=n,
        n_heads=h.heads[0],
        n_kv_heads=h.kv_heads[0],
        ffn_dim=h.ffn_dims[0],
        rope_theta=1e6 if h.rope_theta is None else h.rope_theta,
        rope_local_theta=GGUF_LOCAL_ROPE_THETA,
        norm_eps=1e-6 if h.norm_eps is None else h.norm_eps,
        max_seq_len=h.context or 32768,
        tie_embeddings="output.weight" not in h.tensors,
        sliding_window=window,
        layer_types=["global" if (i + 1) % GGUF_GLOBAL_EVERY == 0 else "sliding" for i in range(n)],
        bos_token_id=token["bos"],
        eos_token_id=token["eos"],
        pad_token_id=token["padding"],
        **_gemma_fields(h.d_model, h.head_dim, h.head_dim),
    )


def gguf_metadata(config: GQAConfig) -> dict:
    """The ``gemma3.*`` keys beyond a Llama block's (without the prefix); refuses what llama.cpp's gemma3 loader cannot express
    (it fixes the layer pattern and the sliding layers' RoPE base, and scales queries by 1/sqrt(head_dim))."""
    _check_gemma(config)
    pattern = ["global" if (i + 1) % GGUF_GLOBAL_EVERY == 0 else "sliding" for i in range(config.n_layers)]
    if config.attention_kinds != pattern or (config.rope_local_theta or config.rope_theta) != GGUF_LOCAL_ROPE_THETA:
        raise GQAUserError(
            "llama.cpp's gemma3 files fix every 6th layer global and RoPE base 10000 on the others; this model "
            "differs: export an HF folder (--export hf)"
        )
    if config.attn_scale is not None and not math.isclose(config.attn_scale, config.resolved_head_dim**-0.5):
        raise GQAUserError("llama.cpp's gemma3 loader scales queries by 1/sqrt(head_dim); export an HF folder")
    return {"attention.sliding_window": config.sliding_window}
