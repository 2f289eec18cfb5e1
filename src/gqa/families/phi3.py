"""Phi-3: one fused ``qkv_proj`` ``[Hq*D + 2*Hkv*D, d]`` (rows: all q heads, then k heads, then v heads)
and ``o_proj``, no biases."""

from __future__ import annotations

from gqa.families.base import O_COLS, QKV_ROWS, AttentionShape, Role

NAME = "phi3"


def attention_map(config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]:
    p = f"model.layers.{layer}.self_attn."
    return {p + "qkv_proj.weight": QKV_ROWS, p + "o_proj.weight": O_COLS}
