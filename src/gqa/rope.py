"""Rotary position embeddings (RoPE), in the "rotate half" layout transformers' Llama uses.

Dimension i of a head is paired with dimension i + D/2 and rotated by angle ``pos * theta^(-2i/D)``.
GGUF files store the interleaved layout; transformers permutes them on load, so checkpoints read
through transformers are already in this layout.
"""

from __future__ import annotations

import torch

from gqa.errors import GQAUserError
from gqa.kernels import cpu_step

__all__ = ["rope_frequencies", "rope_cos_sin", "apply_rope"]


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32."""
    if head_dim % 2:
        raise GQAUserError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] or [B, T] (int) -> cos, sin [.., T, D] in fp32 (the two halves repeat).

    Angles are fp32 even when the model is cast to float64, as in transformers, so float64 parity tests
    compare the same tables.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.float()  # (.., T, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (.., T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] or [B, T, D]. Computed in fp32 (float64 stays float64), returned in x's dtype."""
    fused = cpu_step.rope(x, cos, sin)  # a decode step's few tokens on CPU: one call
    if fused is not None:
        return fused
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D) broadcast over heads
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
