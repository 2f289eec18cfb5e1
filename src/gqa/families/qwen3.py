"""Qwen3: llama's projections plus ``q_norm`` / ``k_norm`` RMSNorms over head_dim, shared by every head."""

from __future__ import annotations

from gqa.families.base import SHARED, AttentionShape, Role
from gqa.families.llama import qkvo_map

NAME = "qwen3"


def attention_map(config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]:
    bias = bool(config.get("attention_bias", False))
    p = f"model.layers.{layer}.self_attn."
    return qkvo_map(config, layer, qkv_bias=bias, o_bias=bias) | {
        p + "q_norm.weight": SHARED,
        p + "k_norm.weight": SHARED,
    }
