"""Static (preallocated) KV cache, sized by the KV heads, never the query heads."""

from __future__ import annotations

import torch

from gqa.errors import GQAUserError
from gqa.units import kv_bytes_per_token

__all__ = ["KVCache", "RingKVCache", "ModelCache"]


def check_sizes(owner: str, **sizes) -> None:
    """Each of ``sizes`` must be a positive integer; a one-line :class:`GQAUserError` naming ``owner`` otherwise."""
    for name, val in sizes.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise GQAUserError(f"{owner} {name} must be a positive integer, got {val!r}")


def _check_new(k_new: torch.Tensor, v_new: torch.Tensor, batch_size: int, n_kv_heads: int, head_dim: int) -> None:
    """New keys/values must be ``[B, Hkv, T, D]`` of the cache's B, Hkv and D, K and V alike."""
    if k_new.shape != v_new.shape:
        raise GQAUserError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ; pass matching K/V")
    if k_new.shape[0] != batch_size or k_new.shape[1] != n_kv_heads or k_new.shape[3] != head_dim:
        raise GQAUserError(
            f"cache holds [B={batch_size}, Hkv={n_kv_heads}, T, D={head_dim}] but got "
            f"{tuple(k_new.shape)}; build the cache with the layer's n_kv_heads and head_dim"
        )


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
        check_sizes("KVCache", batch_size=batch_size, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, head_dim=head_dim)
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
        _check_new(k_new, v_new, self.batch_size, self.n_kv_heads, self.head_dim)
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


def ring_visible_positions(length: int, window: int, t: int, device) -> torch.Tensor:
    """Sequence positions ``[Tk]`` of what :func:`ring_write` returns for ``t`` new tokens after ``length``."""
    n, w = length, window
    if t == 1 and n >= w:  # the full ring after the write: slot s holds the newest position = s mod w
        s = torch.arange(w, device=device)
        return n - (n - s) % w
    old = min(n, w - 1) if t > 1 else n
    return torch.arange(n - old, n + t, device=device)


def ring_write(rings: list[torch.Tensor], news: list[torch.Tensor], *, dim: int, length: int, window: int):
    """Write T new tokens (``news``, token axis ``dim``) into ring buffers of ``window`` slots holding
    ``length`` tokens so far (the token at position q in slot q % window); returns what the new queries
    attend over, one tensor per ring: for one token the ring itself (the held slots, in ring order), for
    several the last window - 1 held tokens then the new ones, in position order (see :class:`RingKVCache`)."""
    n, t, w = length, news[0].shape[dim], window
    device = rings[0].device
    if t == 1:
        for ring, new in zip(rings, news, strict=True):
            ring.narrow(dim, n % w, 1).copy_(new)
        return [ring.narrow(dim, 0, min(n + 1, w)) for ring in rings]
    old = torch.arange(n - min(n, w - 1), n, device=device) % w  # slots of the visible held tokens
    seen = [torch.cat([ring.index_select(dim, old), new], dim=dim) for ring, new in zip(rings, news, strict=True)]
    keep = min(t, w)
    slots = torch.arange(n + t - keep, n + t, device=device) % w
    for ring, new in zip(rings, news, strict=True):
        ring.index_copy_(dim, slots, new.narrow(dim, new.shape[dim] - keep, keep).to(ring.dtype))
    return seen


class RingKVCache:
    """A sliding-window layer's cache: ring buffers ``k``, ``v`` ``[B, Hkv, window, D]``, so its memory is
    bounded by the window however long the sequence grows (Gemma-3's sliding layers: 512 tokens).

    A query at position p sees keys p - window + 1 .. p (:func:`gqa.masks.sliding_window`), so nothing
    older is kept: the token at position q lives in slot ``q % window``. ``length`` counts every token
    written (the RoPE positions continue from it); ``max_seq_len`` is the longest sequence allowed.

    ``update`` returns what the new queries attend over: for one new token the ring itself (``[B, Hkv,
    min(length, window), D]``, slots in ring order: attention does not depend on key order, and every
    held key is inside the window); for several, the keys they can see in position order (the last
    window - 1 held ones, then the new ones). :meth:`visible_slots` gives the sequence positions of those
    keys, so a key-padding mask over all positions can be indexed to match.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, window: int, head_dim: int, *, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        check_sizes("RingKVCache", batch_size=batch_size, n_kv_heads=n_kv_heads, window=window, head_dim=head_dim,
                    max_seq_len=max_seq_len)  # fmt: skip
        shape = (batch_size, n_kv_heads, window, head_dim)  # (B, Hkv, W, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.window, self.max_seq_len, self.length = window, max_seq_len, 0

    batch_size, n_kv_heads, head_dim = KVCache.batch_size, KVCache.n_kv_heads, KVCache.head_dim
    nbytes, bytes_per_token, positions = KVCache.nbytes, KVCache.bytes_per_token, KVCache.positions

    def visible_slots(self, t: int, device=None) -> torch.Tensor:
        """Sequence positions ``[Tk]`` of the keys :meth:`update` will return for ``t`` new tokens."""
        return ring_visible_positions(self.length, self.window, t, device if device is not None else self.k.device)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append ``k_new``/``v_new`` ``[B, Hkv, T, D]``; returns ``(k, v)`` ``[B, Hkv, Tk, D]`` as the class says."""
        _check_new(k_new, v_new, self.batch_size, self.n_kv_heads, self.head_dim)
        n, t, w = self.length, k_new.shape[2], self.window
        if n + t > self.max_seq_len:
            raise GQAUserError(
                f"positions {n}..{n + t - 1} are beyond the cache's {self.max_seq_len} tokens; "
                "allocate a larger max_seq_len or shorten the sequence"
            )
        k, v = ring_write([self.k, self.v], [k_new, v_new], dim=2, length=n, window=w)
        self.length = n + t
        return k, v

    def reset(self) -> None:
        self.length = 0


def _latent_cache(config, i: int, batch_size: int, max_seq_len: int, *, dtype, device):
    """Latent layer ``i``'s cache: rows of R + Hkv x r values (+ one key scale per query head with QK-norm),
    in a ring bounded by the window on a sliding layer."""
    from gqa.cache.latent import LatentKVCache, RingLatentKVCache

    window = config.layer_window(i)
    sizes = (batch_size, config.kv_heads_per_layer[i])
    kw = dict(key_scales=config.n_heads if config.qk_norm else 0, dtype=dtype, device=device)
    rank, rope = config.latent_ranks[i], config.latent_rope_dim
    if window is not None and window < max_seq_len:
        return RingLatentKVCache(*sizes, window, rank, rope, max_seq_len=max_seq_len, **kw)
    return LatentKVCache(*sizes, max_seq_len, rank, rope, **kw)


class ModelCache:
    """One layer cache per layer (:class:`KVCache`, :class:`RingKVCache`, or a
    :class:`gqa.cache.dynamic.DynamicKVCache`); per-layer KV heads (variable GQA) give per-layer sizes.

    This is the model-level cache :meth:`gqa.GQAForCausalLM.forward` takes: ``len(cache)`` layers,
    ``cache[i]`` the :class:`KVCache` layer i writes (each layer advances its own ``length``).
    """

    def __init__(self, layers: list[KVCache | RingKVCache]):
        self.layers = layers

    @classmethod
    def for_config(cls, config, batch_size: int, max_seq_len: int, *, dtype=torch.float32, device=None) -> ModelCache:
        """Allocate a cache for a :class:`gqa.model.GQAConfig` model: a :class:`gqa.cache.LatentKVCache` per
        layer of a latent model, else a :class:`RingKVCache` for each sliding-window layer whose window is
        shorter than ``max_seq_len`` and a :class:`KVCache` otherwise."""
        layers: list = []
        ranks = getattr(config, "latent_ranks", None)
        for i, hkv in enumerate(config.kv_heads_per_layer):
            window, d = config.layer_window(i), config.resolved_head_dim
            if ranks is not None:
                layers.append(_latent_cache(config, i, batch_size, max_seq_len, dtype=dtype, device=device))
            elif window is not None and window < max_seq_len:
                layers.append(RingKVCache(batch_size, hkv, window, d, max_seq_len=max_seq_len, dtype=dtype, device=device))
            else:
                layers.append(KVCache(batch_size, hkv, max_seq_len, d, dtype=dtype, device=device))
        return cls(layers)

    def __getitem__(self, i: int) -> KVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_seq_len(self) -> int:
        return min(c.max_seq_len for c in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers (per sequence)."""
        return sum(c.bytes_per_token() for c in self.layers)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()
