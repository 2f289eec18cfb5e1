"""A static KV cache whose slots follow a per-sequence head map (dynamic grouping, issue 25).

Each layer holds ``Sk`` K slots and ``Sv`` V slots per sequence instead of Hkv heads. A slot is a fixed
linear combination of the layer's Hkv projected heads (a mean over the heads of one cluster), so a new
token's K/V ``[B, Hkv, T, D]`` are merged into the slots with per-sequence weights ``[B, S, Hkv]``, and
query head h of sequence b reads K slot ``k_index[b, h]`` and V slot ``v_index[b, h]``.

:class:`PagedDynamicKVCache` is the paged form: pages of ``S`` slots per layer (the layer's cluster count),
a merge and a head map per sequence.

Attention over slots with any per-sequence map runs the ordinary GQA kernels: the query heads that read
one slot are stacked as the rows of that slot's group (:class:`HeadMap`), so attention over ``S`` slots
with ``G`` query rows each is plain GQA with group size G; the outputs are put back in query-head order.
Padding rows (a slot read by fewer than G heads) repeat a real head and are dropped. The cache returns
a :class:`MappedKV` (the slots, or a paged cache's :class:`~gqa.cache.PagedKV`, and the map) and the
attention layer does the stacking (:func:`gqa.layer.attend`).

Storage only: the maps come from :func:`gqa.generation.dynamic.cluster_heads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.cache.paged import PagedBatch, PagedKV, PagedKVCache
from gqa.errors import GQAUserError

__all__ = ["DynamicKVCache", "HeadMap", "MappedKV", "PagedDynamicKVCache", "PagedDynamicBatch"]


@dataclass(frozen=True)
class HeadMap:
    """Query heads stacked by the slot they read, per sequence.

    rows ``[B, S * G]`` long: the query head at stacked row r (row r reads slot ``r // G``, the GQA
    mapping with group size G); inverse ``[B, Hq]`` long: the stacked row of query head h. G is the most
    query heads any slot of any sequence serves; unused rows repeat a head of theirs (outputs dropped).
    """

    rows: torch.Tensor
    inverse: torch.Tensor
    group: int

    @classmethod
    def from_index(cls, index: torch.Tensor, n_slots: int) -> HeadMap:
        """index ``[B, Hq]`` long: the slot query head h of sequence b reads (every slot < n_slots)."""
        b, hq = index.shape
        idx = index.cpu().tolist()
        group = max(1, max(row.count(s) for row in idx for s in range(n_slots)))
        rows = torch.zeros(b, n_slots * group, dtype=torch.long)
        inverse = torch.empty(b, hq, dtype=torch.long)
        for i, row in enumerate(idx):
            fill = [0] * n_slots
            for h, s in enumerate(row):
                r = s * group + fill[s]
                rows[i, r], inverse[i, h] = h, r
                fill[s] += 1
            for s in range(n_slots):  # pad a slot's unused rows with its first head (or head 0 if it has none)
                first = row.index(s) if s in row else 0
                rows[i, s * group + fill[s] : (s + 1) * group] = first
        return cls(rows.to(index.device), inverse.to(index.device), group)

    def stack(self, q: torch.Tensor) -> torch.Tensor:
        """q ``[B, Hq, T, D]`` -> ``[B, S * G, T, D]`` (row r reads slot r // G)."""
        b, _, t, d = q.shape
        return q.gather(1, self.rows[:, :, None, None].expand(b, -1, t, d))

    def unstack(self, out: torch.Tensor) -> torch.Tensor:
        """out ``[B, S * G, T, D]`` -> ``[B, Hq, T, D]`` in query-head order."""
        b, _, t, d = out.shape
        return out.gather(1, self.inverse[:, :, None, None].expand(b, -1, t, d))


@dataclass(frozen=True)
class MappedKV:
    """What a head-mapped layer cache returns from ``update``: ``kv`` the slots (``(k, v)`` ``[B, S, Tk, D]``
    or a :class:`~gqa.cache.PagedKV` whose pages hold S slots) and the :class:`HeadMap` of the batch."""

    kv: tuple[torch.Tensor, torch.Tensor] | PagedKV
    head_map: HeadMap


class DynamicKVCache:
    """One layer: ``k`` ``[B, Sk, T_max, D]``, ``v`` ``[B, Sv, T_max, D]``, filled in place (one shared length,
    ragged batches left-padded as in :class:`gqa.KVCache`).

    k_merge ``[B, Sk, Hkv]`` / v_merge ``[B, Sv, Hkv]``: slot s of sequence b holds
    ``sum_h merge[b, s, h] * kv_head_h`` (rows of unused slots are zero). k_index / v_index ``[B, Hq]``
    (long): the slot query head h reads. A sequence with fewer clusters than ``Sk`` leaves its last
    slots unused (zeros, never read).

    ``update`` returns the slot buffers ``(k, v)`` themselves when every sequence's map is the contiguous
    one attention already uses (query head h reads slot ``h // (Hq // S)``, K and V alike); a
    :class:`MappedKV` (no copy of K/V: the query heads are stacked by slot) when K and V share one map
    (``values="merge"``); else (V kept per head, ``values="keep"``) a per-sequence gather of K and V to
    ``[B, Hq, Tk, D]`` (a copy per call).
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
        self._head_map = (
            HeadMap.from_index(self.k_index, sk) if sk == sv and torch.equal(self.k_index, self.v_index) else None
        )

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
        if self._head_map is not None:
            return MappedKV((k, v), self._head_map)
        return k[self._batch, self.k_index], v[self._batch, self.v_index]  # (B, Hq, Tk, D) each

    def reset(self) -> None:
        self.length = 0


class PagedDynamicKVCache(PagedKVCache):
    """A :class:`~gqa.cache.PagedKVCache` whose pages hold ``slots_per_layer[i]`` merged slots (K and V alike)
    instead of the layer's Hkv heads, with one map per sequence.

    Args:
        kv_heads_per_layer: the projected KV heads Hkv of each layer (what a new token brings).
        slots_per_layer: slots per layer held in the pages (the cluster count; every sequence has exactly
            that many clusters).
        head_dim, num_pages, page_size, dtype, device: as :class:`~gqa.cache.PagedKVCache`.

    :meth:`add_sequence` takes the sequence's map per layer: merge ``[S, Hkv]`` (slot s holds
    ``sum_h merge[s, h] * head_h``, K and V alike) and index ``[Hq]`` (the slot query head h reads).
    A forward over ``cache.batch(seqs)`` merges each sequence's new K/V with its own weights, stores them,
    and returns a :class:`MappedKV` over the pages.
    """

    def __init__(self, kv_heads_per_layer, slots_per_layer, head_dim: int, num_pages: int, page_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device=None):  # fmt: skip
        if len(kv_heads_per_layer) != len(slots_per_layer) or any(
            not 1 <= s <= h for s, h in zip(slots_per_layer, kv_heads_per_layer, strict=True)
        ):
            raise GQAUserError(
                f"slots per layer {list(slots_per_layer)} must be 1..Hkv for KV heads {list(kv_heads_per_layer)}"
            )
        super().__init__(list(slots_per_layer), head_dim, num_pages, page_size, dtype=dtype, device=device)
        self.kv_heads_per_layer = list(kv_heads_per_layer)
        self.slots_per_layer = list(slots_per_layer)
        self._maps: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._batch_maps: dict[tuple, tuple[list[torch.Tensor], list[HeadMap]]] = {}

    def add_sequence(self, seq, maps=None) -> None:
        """Add ``seq`` with its map: per layer ``(merge [S, Hkv], index [Hq])``."""
        if maps is None or len(maps) != self.num_layers:
            raise GQAUserError(
                f"a dynamic paged cache needs the sequence's map for each of its {self.num_layers} layers"
            )
        device, dtype = self.k_pages[0].device, self.k_pages[0].dtype
        checked = []
        for i, (merge, index) in enumerate(maps):
            s, h = self.slots_per_layer[i], self.kv_heads_per_layer[i]
            if tuple(merge.shape) != (s, h) or index.dim() != 1 or int(index.min()) < 0 or int(index.max()) >= s:
                raise GQAUserError(f"layer {i}: the map must be merge [{s}, {h}] and index [Hq] in 0..{s - 1}, got "
                                   f"{tuple(merge.shape)} and {tuple(index.shape)}")  # fmt: skip
            checked.append((merge.to(device=device, dtype=dtype), index.to(device=device, dtype=torch.long)))
        super().add_sequence(seq)
        self._maps[seq] = checked
        self._batch_maps.clear()

    def release(self, seq) -> None:
        super().release(seq)
        del self._maps[seq]
        self._batch_maps.clear()

    def map_of(self, seq) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(merge [S, Hkv], index [Hq])`` of ``seq``."""
        return list(self._maps[seq])

    def batch_maps(self, seqs: list) -> tuple[list[torch.Tensor], list[HeadMap]]:
        """Per layer: the stacked merges ``[B, S, Hkv]`` and the :class:`HeadMap` of ``seqs`` (kept while the
        sequences in the cache stay the same, so a decode loop builds them once)."""
        key = tuple(seqs)
        if key not in self._batch_maps:
            merges, maps = [], []
            for i in range(self.num_layers):
                merges.append(torch.stack([self._maps[s][i][0] for s in seqs]))  # (B, S, Hkv)
                index = torch.stack([self._maps[s][i][1] for s in seqs])  # (B, Hq)
                maps.append(HeadMap.from_index(index, self.slots_per_layer[i]))
            self._batch_maps[key] = (merges, maps)
        return self._batch_maps[key]

    def batch(self, seqs: list) -> PagedDynamicBatch:
        return PagedDynamicBatch(self, list(seqs))


class PagedDynamicBatch(PagedBatch):
    """A :class:`PagedDynamicKVCache` seen by one forward: each layer merges its new K/V ``[B, Hkv, T, D]`` per
    sequence into the slots, stores them, and returns a :class:`MappedKV` over the pages."""

    def __init__(self, cache: PagedDynamicKVCache, seqs: list):
        super().__init__(cache, seqs)
        self._merges, self._head_maps = cache.batch_maps(seqs)

    def _write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> MappedKV:
        hkv = self.cache.kv_heads_per_layer[layer]
        if k_new.shape != v_new.shape or k_new.shape[:2] != (len(self.seqs), hkv):
            raise GQAUserError(
                f"layer {layer} takes [B={len(self.seqs)}, Hkv={hkv}, T, D] K/V, got {tuple(k_new.shape)}"
            )
        w = self._merges[layer].to(k_new.dtype)  # (B, S, Hkv)
        k = torch.einsum("bsh,bhtd->bstd", w, k_new)  # (B, S, T, D)
        v = torch.einsum("bsh,bhtd->bstd", w, v_new)
        return MappedKV(super()._write(layer, k, v), self._head_maps[layer])
