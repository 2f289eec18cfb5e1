"""Static cache of a latent layer (:class:`gqa.latent.LatentAttention`): one row per token, ``[B, T_max, R +
Hkv*r]`` = [the latent shared by all heads | each KV group's rotated keys] (QK-norm layers add one key scale
per query head), filled in place (one row per token
is what the absorbed attention reads as a single key/value head, see :func:`gqa.latent.latent_attention`)."""

from __future__ import annotations

import torch

from gqa.cache.static import check_sizes
from gqa.errors import GQAUserError
from gqa.units import element_size

__all__ = ["LatentKVCache"]


class LatentKVCache:
    """One latent layer's cache: R + Hkv x r values per token (no per-head K or V).

    ``length`` is the number of slots filled, shared by the batch (ragged batches are left-padded and
    masked, as with :class:`gqa.KVCache`). The layer calls :meth:`update_rows`.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, rank: int, rope_dim: int, *,
                 key_scales: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        check_sizes("LatentKVCache", batch_size=batch_size, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, rank=rank)
        if not isinstance(rope_dim, int) or rope_dim < 0:
            raise GQAUserError(f"LatentKVCache rope_dim must be an integer >= 0, got {rope_dim!r}")
        self.rank, self.n_kv_heads, self.rope_dim = rank, n_kv_heads, rope_dim
        if not isinstance(key_scales, int) or key_scales < 0:
            raise GQAUserError(f"LatentKVCache key_scales must be an integer >= 0, got {key_scales!r}")
        width = rank + n_kv_heads * rope_dim + key_scales
        self.rows = torch.zeros(batch_size, max_seq_len, width, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.rows.shape[1]

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes: (R + Hkv x r [+ key scales]) x element size."""
        return self.rows.shape[2] * element_size(self.rows.dtype)

    def positions(self, t: int, device=None) -> torch.Tensor:
        """RoPE positions ``[T]`` of the next ``t`` tokens (the slots they will fill)."""
        return torch.arange(self.length, self.length + t, device=device if device is not None else self.rows.device)

    def update_rows(self, rows_new: torch.Tensor) -> torch.Tensor:
        """Append the rows ``[B, T, R + Hkv*r]`` of T new tokens; returns a view of every row held, ``[B, Tk,
        R + Hkv*r]`` (the new tokens last)."""
        if rows_new.dim() != 3 or rows_new.shape[0] != self.batch_size or rows_new.shape[2] != self.rows.shape[2]:
            raise GQAUserError(
                f"cache holds rows [B={self.batch_size}, T, R + Hkv*r={self.rows.shape[2]}], got {tuple(rows_new.shape)}; "
                "build the cache with model.make_cache"
            )
        start, end = self.length, self.length + rows_new.shape[1]
        if end > self.max_seq_len:
            raise GQAUserError(
                f"positions {start}..{end - 1} are beyond the cache of {self.max_seq_len} slots; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        self.rows[:, start:end] = rows_new
        self.length = end
        return self.rows[:, :end]

    def reset(self) -> None:
        self.length = 0
