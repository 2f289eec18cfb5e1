"""A Llama-style decoder built from :class:`GQAConfig`: RMSNorm, GQA attention with RoPE, a gated MLP.

The same blocks cover Gemma-3's differences, each a config field: GeGLU (``hidden_act``), norms after
attention and the MLP too (``sandwich_norm``), scaled embeddings (``embed_scale``), QK-norm, a softmax
scale of its own (``attn_scale``) and sliding-window layers with their own RoPE base between global
ones (``layer_types``, ``rope_local_theta``; their caches are ring buffers bounded by the window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqa import masks
from gqa.cache import ModelCache
from gqa.errors import GQAUserError
from gqa.latent import LatentAttention
from gqa.layer import GroupedQueryAttention, Linear, RMSNorm, project
from gqa.model.config import GQAConfig
from gqa.rope import rope_cos_sin

__all__ = ["GQAForCausalLM", "DecoderBlock", "GatedMLP", "SwiGLU"]

_CAUSAL = masks.causal()
_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``act="silu"``, GeGLU with ``"gelu_tanh"``; x [..., d] -> [..., d]."""

    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = Linear(d_model, ffn_dim, bias=bias)
        self.up_proj = Linear(d_model, ffn_dim, bias=bias)
        self.down_proj = Linear(ffn_dim, d_model, bias=bias)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))  # one GEMV call in a decode step
        return self.down_proj(self.act(gate) * up)


SwiGLU = GatedMLP  # the Llama name of the default (silu) gate


class DecoderBlock(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream; with ``sandwich_norm`` each output is
    normed again before the add (Gemma: ``post_attn_norm``, ``post_mlp_norm``)."""

    def __init__(self, config: GQAConfig, n_kv_heads: int, layer: int = 0):
        super().__init__()
        d, eps, fp32 = config.d_model, config.norm_eps, config.norm_scale_fp32
        self.attn_norm = RMSNorm(d, eps, scale_fp32=fp32)
        self.attn = _latent_attention(config, n_kv_heads, layer) if config.latent_rank is not None else GroupedQueryAttention(
            d,
            config.n_heads,
            n_kv_heads,
            config.resolved_head_dim,
            rope_theta=config.layer_rope_theta(layer),
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            qk_norm=config.qk_norm,
            norm_eps=eps,
            scale=config.attn_scale,
            norm_scale_fp32=fp32,
        )
        self.mlp_norm = RMSNorm(d, eps, scale_fp32=fp32)
        self.mlp = GatedMLP(d, config.ffn_dim, config.mlp_bias, config.hidden_act)
        self.post_attn_norm = RMSNorm(d, eps, scale_fp32=fp32) if config.sandwich_norm else nn.Identity()
        self.post_mlp_norm = RMSNorm(d, eps, scale_fp32=fp32) if config.sandwich_norm else nn.Identity()

    def forward(self, x, positions=None, cache=None, mask=_CAUSAL, rope=None):
        """x [B, T, d_model] -> [B, T, d_model]; arguments as :meth:`GroupedQueryAttention.forward`."""
        a = self.attn(self.attn_norm(x), positions=positions, cache=cache, mask=mask, rope=rope)
        x = x + self.post_attn_norm(a)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


def _latent_attention(config: GQAConfig, n_kv_heads: int, layer: int) -> LatentAttention:
    return LatentAttention(
        config.d_model,
        config.n_heads,
        n_kv_heads,
        config.resolved_head_dim,
        config.latent_ranks[layer],
        config.latent_rope_dim,
        rope_theta=config.layer_rope_theta(layer),
        qkv_bias=config.qkv_bias,
        o_bias=config.o_bias,
        latent_norm=config.latent_norm,
        latent_norm_eps=config.latent_norm_eps,
        qk_norm=config.qk_norm,
        norm_scale_fp32=config.norm_scale_fp32,
        norm_eps=config.norm_eps,
        scale=config.attn_scale,
    )


class GQAForCausalLM(nn.Module):
    """Decoder-only language model; layer i has ``config.kv_heads_per_layer[i]`` KV heads."""

    def __init__(self, config: GQAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderBlock(config, h, i) for i, h in enumerate(config.kv_heads_per_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps, scale_fp32=config.norm_scale_fp32)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def make_cache(self, batch_size: int, max_seq_len: int | None = None, *, dtype=None, device=None) -> ModelCache:
        """A static KV cache for this model: one ``[B, Hkv_i, max_seq_len, D]`` buffer pair per layer."""
        p = next(self.parameters())
        return ModelCache.for_config(
            self.config, batch_size, max_seq_len or self.config.max_seq_len, dtype=dtype or p.dtype, device=device or p.device
        )

    def build_mask(self, key_valid: torch.Tensor | None = None, layer: int = 0) -> masks.Mask:
        """Layer ``layer``'s causal (or sliding-window) mask over cache slots, AND key padding when
        ``key_valid`` [B, Tk] (over the keys that layer attends to) is given."""
        w = self.config.layer_window(layer)
        m: masks.Mask = masks.sliding_window(w) if w else masks.causal()
        if key_valid is not None:
            m = m & masks.key_padding(valid=key_valid)
        return m

    def _layer_masks(self, key_valid: torch.Tensor | None, cache, t: int) -> list[masks.Mask]:
        """One default mask per layer; a ring-buffer layer's key padding is indexed to the keys it returns."""
        out = []
        for i in range(len(self.layers)):
            valid = key_valid
            slots = getattr(cache[i], "visible_slots", None) if cache is not None else None
            if valid is not None and slots is not None:
                valid = valid[:, slots(t, valid.device)]  # (B, Tk of this layer)
            out.append(self.build_mask(valid, i))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        key_valid: torch.Tensor | None = None,
        mask: masks.Mask | torch.Tensor | None = None,
        *,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (``[B, logits_to_keep, vocab]`` when given; fp32 if the model is).

        The one forward for training, evaluation, prefill, decode and paged serving.

        positions: RoPE positions [T] or [B, T] (default: ``cache[0].positions(T)``, i.e. continue after
            what the cache holds; ``arange(T)`` without a cache).
        cache: a model-level cache (see :mod:`gqa.cache`): a :class:`ModelCache` from :meth:`make_cache`,
            or ``paged_cache.batch(seqs)`` of a :class:`gqa.cache.PagedKVCache`. It is filled in place
            and then holds the T new tokens.
        key_valid: bool [B, Tk] over all cache slots including the new ones (False = padding).
        mask: overrides every layer's default mask (causal, or sliding-window on the layers that have one;
            aligned bottom-right, per sequence).
        logits_to_keep: run the LM head on the last ``logits_to_keep`` positions only (0 = all, as in
            transformers); generation keeps 1 so a decode step never projects the prompt onto the vocabulary.

        RoPE tables are computed once per call (per distinct head_dim and theta) and shared by all layers.
        """
        if input_ids.dim() != 2:
            raise GQAUserError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}; add a batch dim")
        if cache is not None and len(cache) != len(self.layers):
            raise GQAUserError(
                f"cache has {len(cache)} layers but the model has {len(self.layers)}; build it with model.make_cache"
            )
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise GQAUserError(f"logits_to_keep must be an integer >= 0 (0 = all), got {logits_to_keep!r}")
        t = input_ids.shape[1]
        if positions is None:
            positions = cache[0].positions(t, input_ids.device) if cache is not None else None
        if positions is None:
            positions = torch.arange(t, device=input_ids.device)
        if mask is None:
            layer_masks = self._layer_masks(key_valid, cache, t)
        elif key_valid is not None:
            raise GQAUserError("pass key_valid or mask, not both; add masks.key_padding(valid=...) to your mask")
        else:
            layer_masks = [mask] * len(self.layers)
        x = self.embed(input_ids)  # (B, T, d_model)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)  # in the weights' dtype, as Gemma does
        rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            attn, rope = layer.attn, None
            if isinstance(attn, GroupedQueryAttention) and attn.rope_theta is not None:  # latent layers make their own
                key = (attn.head_dim, attn.rope_theta)  # layers with the same frequencies share one table
                if key not in rope_tables:
                    rope_tables[key] = rope_cos_sin(positions, attn.inv_freq)  # ((B,) T, D) each
                rope = rope_tables[key]
            x = layer(x, positions, cache[i] if cache is not None else None, layer_masks[i], rope)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, logits_to_keep, d_model)
        return self.lm_head(self.norm(x))  # (B, T | logits_to_keep, vocab)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding, no early stop: input_ids [B, T] (no padding) -> [B, T + max_new_tokens].

        Shorthand for :func:`gqa.generate` (the same prefill and decode steps) returning the ids with
        the prompt in front.
        """
        from gqa.generation import generate

        res = generate(self, input_ids, max_new_tokens=max_new_tokens, eos_token_id=None)
        new = torch.tensor(res.tokens, dtype=input_ids.dtype, device=input_ids.device)  # (B, max_new_tokens)
        return torch.cat([input_ids, new], dim=1)
