"""What a conversion weight-map module declares: every attention tensor of a layer and how heads sit in it.

A weight-map module maps one layout's tensor names to :class:`Role` s (its explicit weight map). The
converter (:mod:`gqa.convert.streaming`) turns roles into tensor operations, so weight maps hold no
math. Tensors outside ``self_attn`` do not depend on the number of KV heads and are copied; an
attention tensor that the layout does not list is an error, so a layout that is wrong for a
checkpoint fails before anything is written.

Head mapping: query head h uses KV head h // (Hq // Hkv) (transformers ``repeat_kv`` order); KV
head k owns rows ``k*D .. k*D + D - 1`` of the K and V projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gqa.formats.spec import AttentionShape

__all__ = ["Role", "Layout", "AttentionShape", "Q_ROWS", "O_COLS", "KV_ROWS", "KV_NORM", "QKV_ROWS", "SHARED"]


@dataclass(frozen=True)
class Role:
    """How one tensor's heads are laid out.

    kind:
      - ``q_rows``: dim 0 is Hq heads x D (q projection weight ``[Hq*D, d]`` or bias ``[Hq*D]``).
      - ``o_cols``: dim 1 is Hq heads x D (o projection weight ``[d, Hq*D]``).
      - ``kv_rows``: dim 0 is Hkv heads x D (k/v projection weight or bias): heads are merged.
      - ``kv_norm``: a norm scale over all KV heads ``[Hkv*D]`` (OLMo2 ``k_norm``): merged as a norm.
      - ``qkv_rows``: a fused ``[Hq*D + 2*Hkv*D, d]`` projection (Phi-3 ``qkv_proj``).
      - ``shared``: one tensor used by every head (a per-head-dim norm, the o bias): copied.
      - ``q_head`` / ``kv_head``: one head's own tensor ``[D]`` among a list named by ``template``
        with ``{h}`` for the head index (StableLM per-head layer norms).
    """

    kind: str
    head: int | None = None
    template: str | None = None


Q_ROWS, O_COLS, KV_ROWS, KV_NORM, QKV_ROWS, SHARED = (
    Role("q_rows"),
    Role("o_cols"),
    Role("kv_rows"),
    Role("kv_norm"),
    Role("qkv_rows"),
    Role("shared"),
)


class Layout(Protocol):
    """A conversion weight-map module: its name (in messages) and its per-layer attention weight map.
    Which ``model_type`` s use it is said by their :class:`gqa.families.Family` records."""

    NAME: str

    def attention_map(self, config: dict, layer: int, shape: AttentionShape) -> dict[str, Role]: ...
