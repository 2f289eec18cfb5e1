"""StableLM: llama's projections (q/k/v biases when ``use_qkv_bias``), and with ``qk_layernorm`` one
LayerNorm per head: ``q_layernorm.norms.{h}`` for each query head, ``k_layernorm.norms.{h}`` for
each KV head (merged like the K projection)."""

from __future__ import annotations

from gqa.families.base import AttentionShape, Role
from gqa.families.llama import qkvo_map

NAME = "stablelm"


def attention_map(config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]:
    m = qkvo_map(config, layer, qkv_bias=bool(config.get("use_qkv_bias", False)), o_bias=False)
    if config.get("qk_layernorm", False):
        p = f"model.layers.{layer}.self_attn."
        q_t, k_t = p + "q_layernorm.norms.{h}.weight", p + "k_layernorm.norms.{h}.weight"
        m |= {q_t.format(h=h): Role("q_head", h, q_t) for h in range(shape.n_heads)}
        m |= {k_t.format(h=h): Role("kv_head", h, k_t) for h in range(shape.n_kv_heads)}
    return m
