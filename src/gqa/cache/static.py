"""Static (preallocated) KV cache, sized by the KV heads, never the query heads."""

from __future__ import annotations

import torch

from gqa.errors import GQAUserError
from gqa.units import kv_bytes_per_token

__all__ = ["KVCache", "ModelCache"]


class KVCache:
    """One layer's cache: ``k`` and ``v`` buffers of shape ``[B, Hkv, T_max, D]``, filled in place.

    ``length`` is the number of slots filled (shared by the batch; ragged batches are left-padded
    and masked with :func:`gqa.masks.key_padding`). A GQA layer with Hkv = Hq / g holds g times fewer
    bytes than its multi-head equivalent.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, val in (("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_seq_len", max_seq_len), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise GQAUserError(f"KVCache {name} must be a positive integer, got {val!r}")
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, T_max, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V buffers (2 x B x Hkv x T_max x D x element size)."""
        return self.k.nbytes + self.v.nbytes

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in this layer: 2 x Hkv x D x element size."""
        return kv_bytes_per_token([self.n_kv_heads], self.head_dim, self.k.dtype)

    def positions(self, t: int, device=None) -> torch.Tensor:
        """RoPE positions ``[T]`` of the next ``t`` tokens: the slots they will fill.

        A left-padded batch counts positions from each prompt's first real token instead; the caller
        passes those explicitly (see :func:`gqa.generate`).
        """
        return torch.arange(self.length, self.length + t, device=device if device is not None else self.k.device)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | None = None):
        """Write ``k_new``/``v_new`` ``[B, Hkv, T, D]`` at slots ``start .. start+T-1`` (default: append).

        Returns views ``k[:, :, :end]``, ``v[:, :, :end]`` ``[B, Hkv, end, D]`` of the filled cache (no
        copy); the new tokens are the last T keys, so masks aligned bottom-right apply as they are.
        """
        start = self.length if start is None else start
        t = k_new.shape[2]
        if k_new.shape != v_new.shape:
            raise GQAUserError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ; pass matching K/V")
        if k_new.shape[0] != self.batch_size or k_new.shape[1] != self.n_kv_heads or k_new.shape[3] != self.head_dim:
            raise GQAUserError(
                f"cache holds [B={self.batch_size}, Hkv={self.n_kv_heads}, T, D={self.head_dim}] but got "
                f"{tuple(k_new.shape)}; build the cache with the layer's n_kv_heads and head_dim"
            )
        end = start + t
        if start < 0 or end > self.max_seq_len:
            raise GQAUserError(
                f"positions {start}..{end - 1} are beyond the cache of {self.max_seq_len} slots; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        self.k[:, :, start:end] = k_new
        self.v[:, :, start:end] = v_new
        self.length = max(self.length, end)
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0


class ModelCache:
    """One :class:`KVCache` per layer; per-layer KV heads (variable GQA) give per-layer sizes.

    This is the model-level cache :meth:`gqa.GQAForCausalLM.forward` takes: ``len(cache)`` layers,
    ``cache[i]`` the :class:`KVCache` layer i writes (each layer advances its own ``length``).
    """

    def __init__(self, layers: list[KVCache]):
        self.layers = layers

    @classmethod
    def for_config(cls, config, batch_size: int, max_seq_len: int, *, dtype=torch.float32, device=None) -> ModelCache:
        """Allocate a cache for a :class:`gqa.model.GQAConfig` model."""
        return cls(
            [
                KVCache(batch_size, hkv, max_seq_len, config.resolved_head_dim, dtype=dtype, device=device)
                for hkv in config.kv_heads_per_layer
            ]
        )

    def __getitem__(self, i: int) -> KVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_seq_len(self) -> int:
        return self.layers[0].max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers (per sequence)."""
        return sum(c.bytes_per_token() for c in self.layers)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()
