"""Static cache of a latent layer (:class:`gqa.latent.LatentAttention`): one row per token, ``[B, T_max, R +
Hkv*r]`` = [the latent shared by all heads | each KV group's rotated keys] (QK-norm layers add one key scale
per query head), filled in place (one row per token
is what the absorbed attention reads as a single key/value head, see :func:`gqa.latent.latent_attention`)."""

from __future__ import annotations

import torch

from gqa.cache.static import check_sizes, ring_visible_positions, ring_write
from gqa.errors import GQAUserError
from gqa.units import element_size

__all__ = ["LatentKVCache", "RingLatentKVCache"]


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
        self._check_rows(rows_new)
        start, end = self.length, self.length + rows_new.shape[1]
        if end > self.max_seq_len:
            raise GQAUserError(
                f"positions {start}..{end - 1} are beyond the cache of {self.max_seq_len} slots; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        self.rows[:, start:end] = rows_new
        self.length = end
        return self.rows[:, :end]

    def _check_rows(self, rows_new: torch.Tensor) -> None:
        if rows_new.dim() != 3 or rows_new.shape[0] != self.batch_size or rows_new.shape[2] != self.rows.shape[2]:
            raise GQAUserError(
                f"cache holds rows [B={self.batch_size}, T, R + Hkv*r={self.rows.shape[2]}], got {tuple(rows_new.shape)}; "
                "build the cache with model.make_cache"
            )

    def reset(self) -> None:
        self.length = 0


class RingLatentKVCache(LatentKVCache):
    """A sliding-window latent layer's cache: a ring of ``window`` rows ``[B, window, W]``, so its memory is
    bounded by the window however long the sequence grows (Gemma-3's sliding layers), as
    :class:`gqa.cache.RingKVCache` is for K/V heads: the token at position q lives in slot ``q % window``,
    ``length`` counts every token written and ``max_seq_len`` is the longest sequence allowed. Rows are
    rotated when written, so attention does not depend on the order of the slots it reads."""

    def __init__(self, batch_size: int, n_kv_heads: int, window: int, rank: int, rope_dim: int, *, max_seq_len: int,
                 key_scales: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        check_sizes("RingLatentKVCache", window=window, max_seq_len=max_seq_len)
        super().__init__(batch_size, n_kv_heads, window, rank, rope_dim, key_scales=key_scales, dtype=dtype, device=device)
        self.window, self._max_seq_len = window, max_seq_len

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    def visible_slots(self, t: int, device=None) -> torch.Tensor:
        """Sequence positions ``[Tk]`` of the rows :meth:`update_rows` will return for ``t`` new tokens."""
        return ring_visible_positions(self.length, self.window, t, device if device is not None else self.rows.device)

    def update_rows(self, rows_new: torch.Tensor) -> torch.Tensor:
        """Append the rows ``[B, T, W]`` of T new tokens; returns the rows they attend over (one token: the
        ring's held slots; several: the last window - 1 held rows, then the new ones)."""
        self._check_rows(rows_new)
        n, t = self.length, rows_new.shape[1]
        if n + t > self.max_seq_len:
            raise GQAUserError(
                f"positions {n}..{n + t - 1} are beyond the cache's {self.max_seq_len} tokens; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        (rows,) = ring_write([self.rows], [rows_new], dim=1, length=n, window=self.window)
        self.length = n + t
        return rows
