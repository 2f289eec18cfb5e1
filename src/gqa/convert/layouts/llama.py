"""Separate q/k/v/o projections: llama, mistral, qwen2, gemma, granite, olmo.

``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` with optional biases: q/k/v biases when
``attention_bias`` is set (always for qwen2), an o bias when ``attention_bias`` is set except qwen2.
"""

from __future__ import annotations

from gqa.convert.layouts.base import KV_ROWS, O_COLS, Q_ROWS, SHARED, AttentionShape, Role

NAME = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "granite", "olmo")


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
