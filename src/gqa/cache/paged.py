"""Paged KV cache: fixed-size pages from one pool, a block table per sequence, a free-list allocator.

Layout (shared with :func:`gqa.kernels.paged_decode_attention`), per layer::

    k_pages, v_pages   [num_pages, Hkv, page_size, D]
    block_table        [B, max_pages_per_seq] int32   key n of sequence b is in page
                                                      block_table[b, n // page_size], slot n % page_size
    lengths            [B] int32                      tokens held per sequence

Pages are sized by the KV heads (Hkv, never Hq), and every layer uses the same page ids, so one
block table describes a sequence in all layers (layers may have different Hkv). A sequence holds
``ceil(length / page_size)`` pages, so it wastes less than one page; pages return to the free list
when it finishes and are handed to whichever sequence needs them next.

This module stores K/V and keeps the books; it computes no attention. A forward over some of the
sequences takes :meth:`PagedKVCache.batch` as its cache: layer i writes its new K/V through
``batch[i].update(k_new, v_new)``, which returns a :class:`PagedKV` (the pages, the batch's block
table and lengths) for the attention layer to read (see :mod:`gqa.cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError
from gqa.units import kv_bytes_per_token

__all__ = ["PageAllocator", "PagedKVCache", "PagedBatch", "PagedKV", "OutOfPages"]

#: Why a paged pool refuses a latent layer with QK-norm (its absorbed form scales logits per key, in torch).
NO_PAGED_QK_NORM = "paged caches do not take QK-norm latent layers yet; use the static cache (model.make_cache)"


class OutOfPages(RuntimeError):
    """Raised when an allocation needs more free pages than the pool has; nothing was allocated."""


class PageAllocator:
    """A free list of page ids ``0 .. num_pages-1``. Allocation is all-or-nothing."""

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise GQAUserError(
                f"num_pages must be a positive integer, got {num_pages!r}; give the pool at least one page"
            )
        self.num_pages = num_pages
        # Pop from the end: the lowest ids go out first, which keeps test expectations readable.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages but only {len(self._free)} of {self.num_pages} are free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class PagedKVCache:
    """K/V pages for every layer of a model, and the page lists of the sequences in flight.

    Args:
        kv_heads_per_layer: Hkv of each layer (e.g. ``config.kv_heads_per_layer``).
        head_dim: D.
        num_pages: pages in the pool (shared by all sequences).
        page_size: tokens per page.
        row_widths: per layer None (K/V heads) or the width W of a latent layer's cache row
            (:class:`gqa.latent.LatentAttention`): its pages ``[num_pages, 1, page_size, W]`` are both the
            keys and the values, written with ``batch[i].update_rows(rows)``.

    A sequence is identified by any hashable id. ``reserve(seq, n)`` makes room for n more tokens
    (allocating pages only as needed), ``model(ids, cache=cache.batch(seqs))`` runs a forward that
    stores the new K/V of ``seqs`` and advances their lengths, :meth:`release` frees pages.
    :meth:`block_table` and :meth:`lengths` describe a batch of sequences to a kernel.
    """

    def __init__(
        self,
        kv_heads_per_layer: list[int],
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        row_widths: list[int | None] | None = None,
    ):
        if not isinstance(page_size, int) or page_size < 1:
            raise GQAUserError(f"page_size must be a positive integer, got {page_size!r}; e.g. 16")
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.head_dim = head_dim
        # (num_pages, Hkv, page_size, D) per layer
        widths = row_widths or [None] * len(kv_heads_per_layer)
        shapes = [(h, head_dim) if w is None else (1, w) for h, w in zip(kv_heads_per_layer, widths, strict=True)]
        self.k_pages = [torch.zeros(num_pages, h, page_size, d, dtype=dtype, device=device) for h, d in shapes]
        # A latent layer's row is its key and its value: one tensor (gqa.latent.latent_attention).
        self.v_pages = [k if w is not None else torch.zeros_like(k) for k, w in zip(self.k_pages, widths, strict=True)]
        self._pages: dict[object, list[int]] = {}
        self._length: dict[object, int] = {}

    @classmethod
    def for_model(cls, model, num_pages: int, page_size: int = 16, *, dtype=None, device=None) -> PagedKVCache:
        """A pool for a :class:`gqa.GQAForCausalLM` in the model's dtype and device."""
        p = next(model.parameters())
        cfg = model.config
        if getattr(cfg, "latent_rank", None) is not None and cfg.qk_norm:
            raise GQAUserError(NO_PAGED_QK_NORM)
        return cls(
            cfg.kv_heads_per_layer,
            cfg.resolved_head_dim,
            num_pages,
            page_size,
            dtype=dtype or p.dtype,
            device=device or p.device,
            row_widths=cfg.kv_values_per_token() if getattr(cfg, "latent_rank", None) is not None else None,
        )

    @staticmethod
    def bytes_per_page(kv_heads_per_layer: list[int], head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page across all layers: page_size x (2 x sum of Hkv x D x element size)."""
        return page_size * kv_bytes_per_token(kv_heads_per_layer, head_dim, dtype)

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.k_pages)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + (0 if v is k else v.nbytes) for k, v in zip(self.k_pages, self.v_pages, strict=True))

    def sequences(self) -> list:
        return list(self._pages)

    def length(self, seq) -> int:
        return self._length[seq]

    def pages_of(self, seq) -> list[int]:
        return list(self._pages[seq])

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def add_sequence(self, seq) -> None:
        if seq in self._pages:
            raise GQAUserError(f"sequence {seq!r} is already in the cache; release it first")
        self._pages[seq] = []
        self._length[seq] = 0

    def reserve(self, seq, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens of ``seq``. Raises :class:`OutOfPages` (allocating
        nothing) when the pool is short; other sequences are never touched."""
        need = self.pages_for(self._length[seq] + n_tokens) - len(self._pages[seq])
        if need > 0:
            self._pages[seq].extend(self.allocator.allocate(need))

    def release(self, seq) -> None:
        """Return the pages of ``seq`` to the free list and forget it."""
        self.allocator.free(self._pages.pop(seq))
        del self._length[seq]

    def wasted_slots(self) -> int:
        """Allocated but unused token slots over all sequences (< page_size per sequence)."""
        return sum(len(p) * self.page_size - self._length[s] for s, p in self._pages.items())

    # --- tensors for a batch ---------------------------------------------------------------------
    def batch(self, seqs: list) -> PagedBatch:
        """The model-level cache for one forward over ``seqs`` (their pages reserved beforehand):
        ``model(ids [B, T], cache=cache.batch(seqs))`` stores T new tokens per sequence after its
        current length and advances the lengths by T."""
        return PagedBatch(self, list(seqs))

    def block_table(self, seqs: list, device=None) -> torch.Tensor:
        """``[B, max_pages]`` int32 page ids of ``seqs``; unused entries are 0 (never read)."""
        width = max(1, max(len(self._pages[s]) for s in seqs))
        table = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            pages = self._pages[s]
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(device or self.k_pages[0].device)

    def lengths(self, seqs: list, device=None) -> torch.Tensor:
        """``[B]`` int32 tokens held by each of ``seqs``."""
        return torch.tensor([self._length[s] for s in seqs], dtype=torch.int32, device=device or self.k_pages[0].device)

    def write(
        self,
        layer: int,
        seqs: list,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        block_table: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ) -> None:
        """Store ``k_new``/``v_new`` ``[B, Hkv, T, D]`` at positions ``start .. start+T-1`` of each of
        ``seqs`` (default ``start``: :meth:`lengths`).

        Does not advance the lengths (call :meth:`advance` once all layers are written). The pages
        must have been reserved.
        """
        device = self.k_pages[layer].device
        table = self.block_table(seqs, device) if block_table is None else block_table
        start = self.lengths(seqs, device) if start is None else start
        page, slot = self._slots(table, start, k_new.shape[2])
        self._store(layer, k_new, v_new, page, slot)

    def _slots(self, table: torch.Tensor, start: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ids and slots ``[B*T]`` of positions ``start .. start+T-1`` of each sequence of ``table``."""
        pos = start.long()[:, None] + torch.arange(t, device=table.device)  # (B, T) absolute positions
        if int(pos.max()) >= table.shape[1] * self.page_size:
            raise GQAUserError("writing beyond the reserved pages; call reserve(seq, n_tokens) first")
        page = torch.gather(table.long(), 1, pos // self.page_size).reshape(-1)  # (B*T,)
        return page, (pos % self.page_size).reshape(-1)  # (B*T,)

    def _store(self, layer: int, k_new, v_new, page: torch.Tensor, slot: torch.Tensor) -> None:
        b, hkv, t, d = k_new.shape
        kp, vp = self.k_pages[layer], self.v_pages[layer]
        if hkv != kp.shape[1] or d != kp.shape[3] or k_new.shape != v_new.shape:
            raise GQAUserError(
                f"layer {layer} pages hold [Hkv={kp.shape[1]}, D={kp.shape[3]}] but got k {tuple(k_new.shape)}, "
                f"v {tuple(v_new.shape)}; build the cache with the model's kv_heads_per_layer and head_dim"
            )
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B*T, Hkv, D).
        kp[page, :, slot] = k_new.permute(0, 2, 1, 3).reshape(b * t, hkv, d).to(kp.dtype)
        if vp is not kp:  # a latent layer's row was its value too
            vp[page, :, slot] = v_new.permute(0, 2, 1, 3).reshape(b * t, hkv, d).to(vp.dtype)

    def advance(self, seqs: list, n_tokens: int) -> None:
        """Count ``n_tokens`` more tokens as held by each of ``seqs`` (after :meth:`write`)."""
        for s in seqs:
            new = self._length[s] + n_tokens
            if new > len(self._pages[s]) * self.page_size:
                raise GQAUserError(
                    f"sequence {s!r} would hold {new} tokens in {len(self._pages[s])} pages; reserve first"
                )
            self._length[s] = new


@dataclass(frozen=True)
class PagedKV:
    """What a layer of a :class:`PagedBatch` returns from ``update``: the keys/values to attend over.

    k_pages, v_pages ``[num_pages, Hkv, page_size, D]`` (the layer's whole pool), block_table
    ``[B, max_pages]`` int32 and lengths ``[B]`` int32 (new tokens included). The T new queries of
    sequence b are its last T tokens, at positions ``lengths[b] - T ..``: a mask applies bottom-right
    per sequence, over that sequence's own ``lengths[b]`` keys.
    """

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    lengths: torch.Tensor


class PagedBatch:
    """A :class:`PagedKVCache` seen by one forward over ``seqs``: ``len()`` layers and ``batch[i]`` the
    cache of layer i (``positions(t)``, ``update(k_new, v_new) -> PagedKV``).

    It fixes the block table and the start lengths when made, so make it after :meth:`PagedKVCache.reserve`
    and use it for one forward only. The first layer's write advances the sequences' lengths (every
    layer writes at the same positions, as each layer of a static cache does).
    """

    def __init__(self, cache: PagedKVCache, seqs: list):
        if not seqs:
            raise GQAUserError("a paged batch needs at least one sequence")
        self.cache = cache
        self.seqs = seqs
        device = cache.k_pages[0].device
        self.block_table = cache.block_table(seqs, device)  # (B, max_pages) int32
        self.start = cache.lengths(seqs, device)  # (B,) int32 tokens held before this forward
        self._new_tokens: int | None = None
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lengths: torch.Tensor | None = None
        self._written: set[int] = set()

    def __len__(self) -> int:
        return self.cache.num_layers

    def __getitem__(self, layer: int) -> PagedLayer:
        if not 0 <= layer < self.cache.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.cache.num_layers} layers")
        return PagedLayer(self, layer)

    def positions(self, t: int, device=None) -> torch.Tensor:
        """RoPE positions ``[B, T]`` of the next ``t`` tokens of each sequence: ``start[b] ..``."""
        start = self.start.long()[:, None]  # (B, 1)
        return (start + torch.arange(t, device=start.device)).to(device if device is not None else start.device)

    def _write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> PagedKV:
        b, t = k_new.shape[0], k_new.shape[2]
        if b != len(self.seqs):
            raise GQAUserError(
                f"the batch holds {len(self.seqs)} sequences but the layer wrote {b}; pass one row per sequence"
            )
        if layer in self._written:
            raise GQAUserError(
                f"layer {layer} already wrote through this paged batch; take cache.batch(seqs) for each forward"
            )
        first = self._new_tokens is None
        if first:
            self._slots = self.cache._slots(self.block_table, self.start, t)  # shared by every layer
            self._lengths = self.start + t  # (B,) int32
        elif t != self._new_tokens:
            raise GQAUserError(
                f"layers of one forward wrote {self._new_tokens} and {t} tokens; write the same tokens in every layer"
            )
        self.cache._store(layer, k_new, v_new, *self._slots)
        if first:  # only once the first write succeeded, so a refused write leaves the lengths as they were
            self.cache.advance(self.seqs, t)
            self._new_tokens = t
        self._written.add(layer)
        return PagedKV(self.cache.k_pages[layer], self.cache.v_pages[layer], self.block_table, self._lengths)


@dataclass(frozen=True)
class PagedLayer:
    """Layer ``layer`` of a :class:`PagedBatch` (the object the attention layer calls)."""

    batch: PagedBatch
    layer: int

    def positions(self, t: int, device=None) -> torch.Tensor:
        return self.batch.positions(t, device)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> PagedKV:
        """Store ``k_new``/``v_new`` ``[B, Hkv, T, D]`` after each sequence's tokens; return the
        :class:`PagedKV` to attend over (new tokens included)."""
        return self.batch._write(self.layer, k_new, v_new)

    def update_rows(self, rows: torch.Tensor) -> PagedKV:
        """A latent layer's cache rows ``[B, T, W]``: stored after each sequence's tokens; returns the
        :class:`PagedKV` whose pages ``[num_pages, 1, P, W]`` are both keys and values."""
        r = rows[:, None]  # (B, 1, T, W): one "KV head", the row
        return self.batch._write(self.layer, r, r)
