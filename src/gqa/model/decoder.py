"""A Llama-style decoder built from :class:`GQAConfig`: RMSNorm, GQA attention with RoPE, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqa import masks
from gqa.cache import ModelCache
from gqa.layer import GroupedQueryAttention, RMSNorm
from gqa.model.config import GQAConfig

__all__ = ["GQAForCausalLM", "DecoderBlock", "SwiGLU"]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: GQAConfig, n_kv_heads: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = GroupedQueryAttention(
            config.d_model,
            config.n_heads,
            n_kv_heads,
            config.resolved_head_dim,
            rope_theta=config.rope_theta,
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.norm_eps,
        )
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_dim, config.mlp_bias)

    def forward(self, x, positions, cache, mask):
        x = x + self.attn(self.attn_norm(x), positions=positions, cache=cache, mask=mask)
        return x + self.mlp(self.mlp_norm(x))


class GQAForCausalLM(nn.Module):
    """Decoder-only language model; layer i has ``config.kv_heads_per_layer[i]`` KV heads."""

    def __init__(self, config: GQAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderBlock(config, h) for h in config.kv_heads_per_layer)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> ModelCache:
        """A static KV cache for this model: one ``[B, Hkv_i, max_len, D]`` buffer pair per layer."""
        p = next(self.parameters())
        return ModelCache.for_config(
            self.config, batch, max_len or self.config.max_seq_len, dtype=dtype or p.dtype, device=device or p.device
        )

    def build_mask(self, key_valid: torch.Tensor | None = None) -> masks.Mask:
        """Causal (or sliding-window) mask over cache slots, AND key padding when ``key_valid`` [B, Tk] is given."""
        w = self.config.sliding_window
        m: masks.Mask = masks.sliding_window(w) if w else masks.causal()
        if key_valid is not None:
            m = m & masks.key_padding(valid=key_valid)
        return m

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        key_valid: torch.Tensor | None = None,
        mask: masks.Mask | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32 if the model is).

        positions: RoPE positions [T] or [B, T] (default: continue from ``cache.length``).
        cache: a :class:`ModelCache` from :meth:`make_cache`; it is filled in place.
        key_valid: bool [B, Tk] over all cache slots including the new ones (False = padding).
        mask: overrides the default causal / sliding-window mask (aligned bottom-right).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers but the model has {len(self.layers)}")
        if mask is None:
            mask = self.build_mask(key_valid)
        x = self.embed(input_ids)  # (B, T, d_model)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache[i] if cache is not None else None, mask)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the static cache: prefill, then one token per step.

        input_ids [B, T] (no padding) -> [B, T + max_new_tokens].
        """
        b, t = input_ids.shape
        cache = self.make_cache(b, t + max_new_tokens)
        logits = self(input_ids, cache=cache)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if len(out) - 1 == max_new_tokens:
                break
            logits = self(nxt, cache=cache)
        return torch.cat(out, dim=1)
