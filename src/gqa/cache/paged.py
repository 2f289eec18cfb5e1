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
"""

from __future__ import annotations

import math

import torch

__all__ = ["PageAllocator", "PagedKVCache", "OutOfPages", "paged_attention"]


class OutOfPages(RuntimeError):
    """Raised when an allocation needs more free pages than the pool has; nothing was allocated."""


class PageAllocator:
    """A free list of page ids ``0 .. num_pages-1``. Allocation is all-or-nothing."""

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
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

    A sequence is identified by any hashable id. ``reserve(seq, n)`` makes room for n more tokens
    (allocating pages only as needed), :meth:`write` stores new K/V, :meth:`block_table` and
    :meth:`lengths` describe a batch of sequences to the attention, :meth:`release` frees pages.
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
    ):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.head_dim = head_dim
        # (num_pages, Hkv, page_size, D) per layer
        self.k_pages = [
            torch.zeros(num_pages, h, page_size, head_dim, dtype=dtype, device=device) for h in kv_heads_per_layer
        ]
        self.v_pages = [torch.zeros_like(k) for k in self.k_pages]
        self._pages: dict[object, list[int]] = {}
        self._length: dict[object, int] = {}

    @classmethod
    def for_model(cls, model, num_pages: int, page_size: int = 16, *, dtype=None, device=None) -> PagedKVCache:
        """A pool for a :class:`gqa.GQAForCausalLM` in the model's dtype and device."""
        p = next(model.parameters())
        cfg = model.config
        return cls(
            cfg.kv_heads_per_layer,
            cfg.resolved_head_dim,
            num_pages,
            page_size,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    @staticmethod
    def bytes_per_page(kv_heads_per_layer: list[int], head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page across all layers: sum of 2 x Hkv x page_size x D x element size."""
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(2 * h * page_size * head_dim * elem for h in kv_heads_per_layer)

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
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k_pages, self.v_pages, strict=True))

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
            raise ValueError(f"sequence {seq!r} is already in the cache; release it first")
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

    def write(self, layer: int, seqs: list, k_new: torch.Tensor, v_new: torch.Tensor, block_table=None) -> None:
        """Store ``k_new``/``v_new`` ``[B, Hkv, T, D]`` at positions ``length(seq) .. length(seq)+T-1``.

        Does not advance the lengths (call :meth:`advance` once all layers are written). The pages
        must have been reserved.
        """
        b, hkv, t, d = k_new.shape
        kp, vp = self.k_pages[layer], self.v_pages[layer]
        if hkv != kp.shape[1] or d != kp.shape[3] or k_new.shape != v_new.shape:
            raise ValueError(
                f"layer {layer} pages hold [Hkv={kp.shape[1]}, D={kp.shape[3]}] but got k {tuple(k_new.shape)}, "
                f"v {tuple(v_new.shape)}"
            )
        device = kp.device
        table = self.block_table(seqs, device) if block_table is None else block_table
        start = self.lengths(seqs, device).long()  # (B,)
        pos = start[:, None] + torch.arange(t, device=device)  # (B, T) absolute positions
        if int(pos.max()) >= table.shape[1] * self.page_size:
            raise ValueError("writing beyond the reserved pages; call reserve(seq, n_tokens) first")
        page = torch.gather(table.long(), 1, pos // self.page_size).reshape(-1)  # (B*T,)
        slot = (pos % self.page_size).reshape(-1)  # (B*T,)
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B*T, Hkv, D).
        kp[page, :, slot] = k_new.permute(0, 2, 1, 3).reshape(b * t, hkv, d).to(kp.dtype)
        vp[page, :, slot] = v_new.permute(0, 2, 1, 3).reshape(b * t, hkv, d).to(vp.dtype)

    def advance(self, seqs: list, n_tokens: int) -> None:
        """Count ``n_tokens`` more tokens as held by each of ``seqs`` (after :meth:`write`)."""
        for s in seqs:
            new = self._length[s] + n_tokens
            if new > len(self._pages[s]) * self.page_size:
                raise ValueError(
                    f"sequence {s!r} would hold {new} tokens in {len(self._pages[s])} pages; reserve first"
                )
            self._length[s] = new

    def gather(self, layer: int, seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies ``[B, Hkv, n_pages * page_size, D]`` of the K/V of ``seqs`` (slots past
        each length hold stale data: mask them)."""
        table = self.block_table(seqs)
        return _gather(self.k_pages[layer], table), _gather(self.v_pages[layer], table)


def _gather(pages: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, n = table.shape
    g = pages[table.long()]  # (B, n, Hkv, P, D)
    return g.permute(0, 2, 1, 3, 4).reshape(b, pages.shape[1], n * pages.shape[2], pages.shape[3])  # (B, Hkv, T, D)


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over a paged cache.

    q ``[B, Hq, Tq, D]`` are the last Tq tokens of each sequence: token t of sequence b is at position
    ``lengths[b] - Tq + t`` and sees keys ``0 ..`` its own position (bottom-right; also only the last
    ``window`` keys when given). k/v_pages ``[num_pages, Hkv, P, D]``, block_table ``[B, max_pages]``
    int32, lengths ``[B]`` (new tokens included). Query head h uses KV head ``h // (Hq // Hkv)``.

    Decode-sized queries (Tq <= 16) run :func:`gqa.kernels.paged_decode_attention` when the kernels
    provide it; longer ones (prefill) gather the pages into a contiguous ``[B, Hkv, T, D]`` copy and run
    :func:`gqa.attention` with an explicit mask.
    """
    from gqa import kernels

    tq = q.shape[2]
    kernel = getattr(kernels, "paged_decode_attention", None)
    if kernel is not None and tq <= getattr(kernels, "MAX_QUERY_TOKENS", 0):
        return kernel(q, k_pages, v_pages, block_table, lengths, scale=scale, window=window)
    from gqa.functional import attention

    page_size = k_pages.shape[2]
    n_pages = math.ceil(int(lengths.max()) / page_size)
    table = block_table[:, :n_pages]
    k, v = _gather(k_pages, table), _gather(v_pages, table)  # (B, Hkv, n_pages*P, D)
    lengths = lengths.to(q.device).long()
    k_pos = torch.arange(k.shape[2], device=q.device)  # (Tk,)
    q_pos = lengths[:, None] - tq + torch.arange(tq, device=q.device)  # (B, Tq)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # (B, Tq, Tk): causal, which also hides slots >= length
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    return attention(q, k, v, mask=allowed[:, None], scale=scale)  # (B, Hq, Tq, D)
