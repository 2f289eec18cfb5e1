"""A static KV cache whose slots follow a per-sequence head map (dynamic grouping, issue 25).

Each layer holds ``Sk`` K slots and ``Sv`` V slots per sequence instead of Hkv heads. A slot is a fixed
linear combination of the layer's Hkv projected heads (a mean over the heads of one cluster), so a new
token's K/V ``[B, Hkv, T, D]`` are merged into the slots with per-sequence weights ``[B, S, Hkv]``, and
query head h of sequence b reads K slot ``k_index[b, h]`` and V slot ``v_index[b, h]``.

Storage only: the maps come from :func:`gqa.generation.dynamic.cluster_heads`.
"""

from __future__ import annotations

import torch

from gqa.errors import GQAUserError

__all__ = ["DynamicKVCache"]


class DynamicKVCache:
    """One layer: ``k`` ``[B, Sk, T_max, D]``, ``v`` ``[B, Sv, T_max, D]``, filled in place (one shared length,
    ragged batches left-padded as in :class:`gqa.KVCache`).

    k_merge ``[B, Sk, Hkv]`` / v_merge ``[B, Sv, Hkv]``: slot s of sequence b holds
    ``sum_h merge[b, s, h] * kv_head_h`` (rows of unused slots are zero). k_index / v_index ``[B, Hq]``
    (long): the slot query head h reads. A sequence with fewer clusters than ``Sk`` leaves its last
    slots unused (zeros, never read).

    ``update`` returns ``(k, v)`` for :func:`gqa.attention`: the slot buffers themselves when every
    sequence's map is the contiguous one attention already uses (query head h reads slot
    ``h // (Hq // S)``, K and V alike), else a per-sequence gather to ``[B, Hq, Tk, D]`` (a copy per
    call: correct for any map, not yet fast).
    """

    def __init__(self, k_merge, v_merge, k_index, v_index, max_seq_len: int, head_dim: int, *, dtype, device=None):
        b, sk, hkv = k_merge.shape
        sv = v_merge.shape[1]
        if v_merge.shape != (b, sv, hkv) or k_index.shape != v_index.shape or k_index.shape[0] != b:
            raise GQAUserError("merge weights [B, S, Hkv] and head indices [B, Hq] must agree in B and Hkv")
        self.k = torch.zeros(b, sk, max_seq_len, head_dim, dtype=dtype, device=device)  # (B, Sk, T_max, D)
        self.v = torch.zeros(b, sv, max_seq_len, head_dim, dtype=dtype, device=device)  # (B, Sv, T_max, D)
        self.k_merge = k_merge.to(device=device, dtype=dtype)
        self.v_merge = v_merge.to(device=device, dtype=dtype)
        self.k_index = k_index.to(device=device, dtype=torch.long)
        self.v_index = v_index.to(device=device, dtype=torch.long)
        self.length = 0
        hq = k_index.shape[1]
        heads = torch.arange(hq, device=self.k_index.device)
        eye = torch.eye(hkv, dtype=dtype, device=device)
        # The map attention already uses (h -> h // g) and slots equal to the projected heads: no merge, no gather.
        self._k_identity = sk == hkv and bool((self.k_merge == eye).all())
        self._v_identity = sv == hkv and bool((self.v_merge == eye).all())
        self._native = (
            sk == sv
            and hq % sk == 0
            and bool((self.k_index == heads // (hq // sk)).all())
            and bool((self.v_index == heads // (hq // sv)).all())
        )
        self._batch = torch.arange(b, device=self.k_index.device)[:, None]  # (B, 1)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def n_kv_heads(self) -> int:
        """The projected heads a new token brings (Hkv), before merging."""
        return self.k_merge.shape[2]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def slots_used(self) -> torch.Tensor:
        """``[B]`` K plus V slots each sequence actually uses (non-zero merge rows)."""
        return (self.k_merge != 0).any(-1).sum(-1) + (self.v_merge != 0).any(-1).sum(-1)

    def positions(self, t: int, device=None) -> torch.Tensor:
        return torch.arange(self.length, self.length + t, device=device if device is not None else self.k.device)

    def merge(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new / v_new ``[B, Hkv, T, D]`` -> slot values ``[B, Sk, T, D]``, ``[B, Sv, T, D]``."""
        k = k_new if self._k_identity else torch.einsum("bsh,bhtd->bstd", self.k_merge, k_new.to(self.k.dtype))
        v = v_new if self._v_identity else torch.einsum("bsh,bhtd->bstd", self.v_merge, v_new.to(self.v.dtype))
        return k, v

    def write_slots(self, k_slots: torch.Tensor, v_slots: torch.Tensor, start: int) -> None:
        """Write already merged slot values ``[B, Sk, T, D]`` / ``[B, Sv, T, D]`` at ``start .. start+T-1``."""
        end = start + k_slots.shape[2]
        if start < 0 or end > self.max_seq_len:
            raise GQAUserError(
                f"positions {start}..{end - 1} are beyond the cache of {self.max_seq_len} slots; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        self.k[:, :, start:end] = k_slots
        self.v[:, :, start:end] = v_slots
        self.length = max(self.length, end)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Merge and append ``k_new``/``v_new`` ``[B, Hkv, T, D]``; returns ``(k, v)`` as the class says."""
        if k_new.shape != v_new.shape or k_new.shape[0] != self.batch_size or k_new.shape[1] != self.n_kv_heads:
            raise GQAUserError(
                f"dynamic cache takes [B={self.batch_size}, Hkv={self.n_kv_heads}, T, D] K/V, got {tuple(k_new.shape)}"
            )
        start = self.length
        self.write_slots(*self.merge(k_new, v_new), start)
        end = self.length
        k, v = self.k[:, :, :end], self.v[:, :, :end]  # (B, S, Tk, D)
        if self._native:
            return k, v
        return k[self._batch, self.k_index], v[self._batch, self.v_index]  # (B, Hq, Tk, D) each

    def reset(self) -> None:
        self.length = 0
