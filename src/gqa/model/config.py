"""``GQAConfig``: one dataclass describes a Llama-style decoder, with per-layer KV heads allowed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from gqa.errors import GQAUserError
from gqa.model.files import read_json_object

__all__ = ["GQAConfig", "LIMITS", "check_int", "check_kv_heads", "ACTIVATIONS", "LAYER_TYPES"]

#: MLP gate activations: SwiGLU (silu) and GeGLU with the tanh approximation of GELU (Gemma).
ACTIVATIONS = ("silu", "gelu_tanh")
#: Attention kinds of a layer: full causal, or causal over the last ``sliding_window`` tokens.
LAYER_TYPES = ("global", "sliding")

#: Upper bounds on config integers: far above any real model (Llama-3.1-405B: 126 layers, 128 heads,
#: d_model 16384, ffn 53248, vocab 128256; the longest contexts are ~10M tokens), low enough that a
#: typo such as ``num_hidden_layers: 1e9`` is refused before anything is allocated or enumerated.
LIMITS = {
    "vocab_size": 2**24,
    "d_model": 2**18,
    "n_layers": 2**12,
    "n_heads": 2**12,
    "n_kv_heads": 2**12,
    "head_dim": 2**13,
    "ffn_dim": 2**20,
    "max_seq_len": 2**30,
    "sliding_window": 2**30,
}


def check_int(
    name: str,
    value,
    *,
    limit: int | None = None,
    minimum: int = 1,
    field: str | None = None,
    fix: str = "fix it in the config",
) -> int:
    """``value`` as an int in ``[minimum, limit]`` (limit default: ``LIMITS[name]``), else a one-line
    :class:`GQAUserError` naming ``field`` (the name the user wrote, e.g. ``num_hidden_layers``) and ending
    in ``fix``.

    The one place config integers are validated (gqa's config, transformers config.json, GGUF metadata,
    ``gqa memory``).
    Integral floats (``8.0``) are accepted; bools, strings, NaN and fractions are not.
    """
    label = field or name
    limit = LIMITS.get(name) if limit is None else limit
    short = label.rsplit(": ", 1)[-1]  # without a file name in front: "x.gguf: llama.block_count"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise GQAUserError(f"{short}={value!r} is not a whole number: {label} must be an integer; {fix}")
    if isinstance(value, float):
        if limit is not None and abs(value) > limit:
            raise GQAUserError(f"{label}={value:g} is too large: use a whole number from {minimum} to {limit}; {fix}")
        value = int(value)
    if value < minimum or (limit is not None and value > limit):
        if limit is None:
            raise GQAUserError(f"{short}={value} is out of range: {label} must be >= {minimum}; {fix}")
        raise GQAUserError(
            f"{short}={value} is out of range: {label} must be between {minimum} and {limit}, got {value} "
            f"(a whole number from {minimum} to {limit}); {fix}"
        )
    return value


def check_kv_heads(n_heads: int, kv_heads: list[int], *, field: str = "n_kv_heads", allow_zero: bool = False) -> None:
    """Every KV head count divides ``n_heads`` (0 allowed for layers without attention if ``allow_zero``)."""
    for h in kv_heads:
        if allow_zero and h == 0:
            continue
        if h < 1 or n_heads % h:
            divisors = [d for d in range(1, min(n_heads, LIMITS["n_heads"]) + 1) if n_heads % d == 0]
            raise GQAUserError(
                f"{field}={h} does not divide the {n_heads} query heads; use a divisor of {n_heads}: {divisors}"
            )


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
    sliding_window: int | None = None  # causal sliding window over the last N tokens (Mistral; Gemma-3's sliding layers)
    # Per layer "global" (full causal attention) or "sliding" (the last sliding_window tokens, with RoPE base
    # rope_local_theta); None: every layer alike (sliding if sliding_window is set). Gemma-3: 5 sliding, 1 global.
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of "sliding" layers; None = rope_theta
    hidden_act: str = "silu"  # MLP gate: "silu" (SwiGLU, Llama) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float | None = None  # token embeddings multiplied by this (Gemma: sqrt(d_model)); None = 1
    sandwich_norm: bool = False  # RMSNorm also after attention and after the MLP, before the residual add (Gemma 2/3)
    norm_scale_fp32: bool = False  # RMSNorm scales in fp32 before casting back (Gemma) instead of after (Llama)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    # Low-rank latent KV (MLA-style, see gqa.latent): per layer the rank R of the latent shared by all heads
    # (one int for every layer or a list), None = plain GQA. Each of a layer's n_kv_heads groups keeps its own
    # latent_rope_dim rotated key dims; a token then takes R + n_kv_heads * latent_rope_dim cache values.
    latent_rank: int | list[int] | None = None
    latent_rope_dim: int | None = None  # rotated dims per KV group (even, <= head_dim); required with latent_rank
    latent_norm: bool = False  # RMSNorm over the latent before the up-projections (DeepSeek-V2's kv_a_layernorm)
    latent_norm_eps: float | None = None  # that norm's epsilon; None = norm_eps (transformers' DeepSeek-V2: 1e-6)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # fields carried from a source config, kept on save

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            setattr(self, name, check_int(name, getattr(self, name), field=f"GQAConfig.{name}"))
        if self.head_dim is not None:
            self.head_dim = check_int("head_dim", self.head_dim, field="GQAConfig.head_dim")
        elif self.d_model % self.n_heads:
            raise GQAUserError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
            )
        heads = self.n_kv_heads
        if isinstance(heads, (list, tuple)):
            if len(heads) != self.n_layers:
                raise GQAUserError(
                    f"n_kv_heads lists {len(heads)} layers but n_layers={self.n_layers}; give one entry per layer"
                )
            heads = [check_int("n_kv_heads", h, field="n_kv_heads") for h in heads]
            self.n_kv_heads = heads
        else:
            self.n_kv_heads = check_int("n_kv_heads", heads, field="n_kv_heads")
            heads = [self.n_kv_heads]
        check_kv_heads(self.n_heads, heads)
        if self.sliding_window is not None:
            self.sliding_window = check_int("sliding_window", self.sliding_window, field="sliding_window")
        self._check_layer_kinds()
        self._check_latent()

    def _check_latent(self) -> None:
        if self.latent_rank is None:
            if self.latent_rope_dim is not None or self.latent_norm or self.latent_norm_eps is not None:
                raise GQAUserError("latent_rope_dim / latent_norm(_eps) are set but latent_rank is not; set latent_rank or drop them")
            return
        ranks = self.latent_rank if isinstance(self.latent_rank, (list, tuple)) else [self.latent_rank] * self.n_layers
        if len(ranks) != self.n_layers:
            raise GQAUserError(f"latent_rank lists {len(ranks)} layers but n_layers={self.n_layers}; give one entry per layer")
        ranks = [check_int("latent_rank", r, limit=LIMITS["d_model"]) for r in ranks]
        self.latent_rank = ranks if isinstance(self.latent_rank, (list, tuple)) else ranks[0]
        d = self.resolved_head_dim
        rope = self.latent_rope_dim
        if rope is not None:
            rope = check_int("latent_rope_dim", rope, limit=d, minimum=0, fix=f"use an even number from 0 to head_dim={d}")
        if rope is None or rope % 2:
            raise GQAUserError(f"latent_rope_dim={self.latent_rope_dim!r} must be an even number from 0 to head_dim={d}")
        self.latent_rope_dim = rope

    @property
    def latent_ranks(self) -> list[int] | None:
        """The latent rank of every layer, or None for a GQA model."""
        if self.latent_rank is None:
            return None
        return list(self.latent_rank) if isinstance(self.latent_rank, list) else [self.latent_rank] * self.n_layers

    def kv_values_per_token(self) -> list[int]:
        """Cache values one token takes in each layer: 2 x Hkv x D (GQA) or R + Hkv x latent_rope_dim (latent; with
        QK-norm also one key scale per query head, see :mod:`gqa.latent`)."""
        ranks, d = self.latent_ranks, self.resolved_head_dim
        if ranks is None:
            return [2 * h * d for h in self.kv_heads_per_layer]
        scales = self.n_heads if self.qk_norm else 0
        return [r + h * self.latent_rope_dim + scales for r, h in zip(ranks, self.kv_heads_per_layer, strict=True)]

    def _check_layer_kinds(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise GQAUserError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
        if self.layer_types is None:
            return
        types = list(self.layer_types)
        if len(types) != self.n_layers or any(t not in LAYER_TYPES for t in types):
            raise GQAUserError(
                f"layer_types must list {self.n_layers} entries, each one of {', '.join(LAYER_TYPES)}; got {types[:8]}"
            )
        if "sliding" in types and self.sliding_window is None:
            raise GQAUserError("layer_types has sliding layers but sliding_window is not set; give the window size")
        self.layer_types = types

    @property
    def attention_kinds(self) -> list[str]:
        """Per layer "global" or "sliding" (see ``layer_types``)."""
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["sliding" if self.sliding_window else "global"] * self.n_layers

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` in tokens, or None for full causal attention."""
        return self.sliding_window if self.attention_kinds[i] == "sliding" else None

    def layer_rope_theta(self, i: int) -> float:
        """The RoPE base of layer ``i``: ``rope_local_theta`` on sliding layers when set, else ``rope_theta``."""
        local = self.layer_types is not None and self.attention_kinds[i] == "sliding"
        return self.rope_local_theta if local and self.rope_local_theta is not None else self.rope_theta

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
        """KV-cache bytes per token of one sequence: sum over layers of :meth:`kv_values_per_token` x element size."""
        from gqa.units import element_size

        return sum(self.kv_values_per_token()) * element_size(dtype)

    def kv_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes of one sequence of ``context`` tokens: a sliding layer holds at most its window
        (its cache is a ring buffer), a global layer every token."""
        from gqa.units import element_size

        total = 0
        for i, values in enumerate(self.kv_values_per_token()):
            window = self.layer_window(i)
            tokens = min(context, window) if window else context
            total += tokens * values * element_size(dtype)
        return total

    def num_parameters(self) -> int:
        d, hd, f = self.d_model, self.resolved_head_dim, self.ffn_dim
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        ranks = self.latent_ranks or [None] * self.n_layers
        for hkv, rank in zip(self.kv_heads_per_layer, ranks, strict=True):
            if rank is None:
                attn = d * self.n_heads * hd * 2 + d * hkv * hd * 2
                if self.qkv_bias:
                    attn += (self.n_heads + 2 * hkv) * hd
            else:  # q, latent down, rotated keys, K and V up-projections, o (see gqa.latent)
                rope = self.latent_rope_dim
                attn = d * self.n_heads * hd * 2 + (d + int(self.qkv_bias)) * (rank + hkv * rope)
                attn += rank * self.n_heads * (2 * hd - rope) + (rank if self.latent_norm else 0)
                if self.qkv_bias:
                    attn += self.n_heads * hd
            if self.o_bias:
                attn += d
            if self.qk_norm:
                attn += 2 * hd
            mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
            total += attn + mlp + (4 if self.sandwich_norm else 2) * d
        return total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GQAConfig:
        if not isinstance(d, dict):
            raise GQAUserError(f"a GQAConfig is a JSON object of fields, got a {type(d).__name__}; fix the config file")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GQAUserError(f"unknown GQAConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GQAConfig:
        return cls.from_dict(read_json_object(path, fix="fix the config file"))
