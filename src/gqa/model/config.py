"""``GQAConfig``: one dataclass describes a Llama-style decoder, with per-layer KV heads allowed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

__all__ = ["GQAConfig"]


@dataclass
class GQAConfig:
    vocab_size: int = 32000
    d_model: int = 4096  # hidden width (transformers: hidden_size)
    n_layers: int = 32
    n_heads: int = 32  # query heads Hq
    # KV heads Hkv: one int for every layer, or a list with one entry per layer (variable GQA,
    # e.g. DeciLM-7B mixes 4, 2 and 1). Each must divide n_heads; query head h uses KV head h // g.
    n_kv_heads: int | list[int] = 32
    head_dim: int | None = None  # per-head width D; None means d_model // n_heads
    ffn_dim: int = 11008  # SwiGLU hidden width (transformers: intermediate_size)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 4096  # longest sequence the model is meant for (cache size default)
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, OLMo2)
    sliding_window: int | None = None  # causal sliding window over the last N tokens (Mistral)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # fields carried from a source config, kept on save

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"GQAConfig.{name} must be a positive integer, got {val!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
            )
        heads = self.n_kv_heads
        if isinstance(heads, (list, tuple)):
            heads = list(heads)
            if len(heads) != self.n_layers:
                raise ValueError(
                    f"n_kv_heads lists {len(heads)} layers but n_layers={self.n_layers}; give one entry per layer"
                )
            self.n_kv_heads = heads
        else:
            heads = [heads]
        for h in heads:
            if not isinstance(h, int) or h < 1 or self.n_heads % h:
                raise ValueError(
                    f"n_kv_heads={h!r} does not divide n_heads={self.n_heads}; "
                    f"use a divisor of {self.n_heads}: {[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads_per_layer(self) -> list[int]:
        if isinstance(self.n_kv_heads, list):
            return list(self.n_kv_heads)
        return [self.n_kv_heads] * self.n_layers

    @property
    def is_variable(self) -> bool:
        return len(set(self.kv_heads_per_layer)) > 1

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes per token of one sequence: sum over layers of 2 x Hkv x D x element size."""
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(2 * h * self.resolved_head_dim * elem for h in self.kv_heads_per_layer)

    def num_parameters(self) -> int:
        d, hd, f = self.d_model, self.resolved_head_dim, self.ffn_dim
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        for hkv in self.kv_heads_per_layer:
            attn = d * self.n_heads * hd * 2 + d * hkv * hd * 2
            if self.qkv_bias:
                attn += (self.n_heads + 2 * hkv) * hd
            if self.o_bias:
                attn += d
            if self.qk_norm:
                attn += 2 * hd
            mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
            total += attn + mlp + 2 * d
        return total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GQAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GQAConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GQAConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
