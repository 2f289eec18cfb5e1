"""Static cache of a latent layer (:class:`gqa.latent.LatentAttention`): the latent ``[B, T_max, R]`` shared
by all heads and each KV group's rotated keys ``[B, Hkv, T_max, r]``, filled in place."""

from __future__ import annotations

import torch

from gqa.errors import GQAUserError
from gqa.units import element_size

__all__ = ["LatentKVCache"]


class LatentKVCache:
    """One latent layer's cache: R + Hkv x r values per token (no per-head K or V).

    ``length`` is the number of slots filled, shared by the batch (ragged batches are left-padded and
    masked, as with :class:`gqa.KVCache`). The layer calls :meth:`update_latent`.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, rank: int, rope_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        for name, val in (("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_seq_len", max_seq_len), ("rank", rank)):
            if not isinstance(val, int) or val < 1:
                raise GQAUserError(f"LatentKVCache {name} must be a positive integer, got {val!r}")
        if not isinstance(rope_dim, int) or rope_dim < 0:
            raise GQAUserError(f"LatentKVCache rope_dim must be an integer >= 0, got {rope_dim!r}")
        self.latent = torch.zeros(batch_size, max_seq_len, rank, dtype=dtype, device=device)  # (B, T_max, R)
        self.k_rope = torch.zeros(batch_size, n_kv_heads, max_seq_len, rope_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.latent.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.latent.shape[1]

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes: (R + Hkv x r) x element size."""
        return (self.latent.shape[2] + self.k_rope.shape[1] * self.k_rope.shape[3]) * element_size(self.latent.dtype)

    def positions(self, t: int, device=None) -> torch.Tensor:
        """RoPE positions ``[T]`` of the next ``t`` tokens (the slots they will fill)."""
        return torch.arange(self.length, self.length + t, device=device if device is not None else self.latent.device)

    def update_latent(self, latent_new: torch.Tensor, k_rope_new: torch.Tensor):
        """Append latent ``[B, T, R]`` and rotated keys ``[B, Hkv, T, r]``; returns views of everything held,
        ``[B, Tk, R]`` and ``[B, Hkv, Tk, r]`` (the new tokens last)."""
        b, t = latent_new.shape[:2]
        if latent_new.shape[0] != self.batch_size or latent_new.shape[2:] != self.latent.shape[2:] or (
            k_rope_new.shape != (b, *self.k_rope.shape[1:2], t, self.k_rope.shape[3])
        ):
            raise GQAUserError(
                f"cache holds latent [B={self.batch_size}, T, R={self.latent.shape[2]}] and rotated keys "
                f"[B, Hkv={self.k_rope.shape[1]}, T, r={self.k_rope.shape[3]}], got {tuple(latent_new.shape)} and "
                f"{tuple(k_rope_new.shape)}; build the cache with model.make_cache"
            )
        start, end = self.length, self.length + t
        if end > self.max_seq_len:
            raise GQAUserError(
                f"positions {start}..{end - 1} are beyond the cache of {self.max_seq_len} slots; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        self.latent[:, start:end] = latent_new
        self.k_rope[:, :, start:end] = k_rope_new
        self.length = end
        return self.latent[:, :end], self.k_rope[:, :, :end]

    def reset(self) -> None:
        self.length = 0
