"""OLMo2: llama's projections plus RMSNorms over the whole projection output.

``q_norm`` is ``[Hq*D]`` (permuted with the query heads) and ``k_norm`` is ``[Hkv*D]``: its scales
are merged per head like the K projection. Its statistic spans all KV heads, so with fewer heads the
normalization itself changes; only the identity conversion is exact.
"""

from __future__ import annotations

from gqa.families.base import KV_NORM, Q_ROWS, AttentionShape, Role
from gqa.families.llama import qkvo_map

NAME = "olmo2"


def attention_map(config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]:
    bias = bool(config.get("attention_bias", False))
    p = f"model.layers.{layer}.self_attn."
    return qkvo_map(config, layer, qkv_bias=bias, o_bias=bias) | {
        p + "q_norm.weight": Q_ROWS,
        p + "k_norm.weight": KV_NORM,
    }
