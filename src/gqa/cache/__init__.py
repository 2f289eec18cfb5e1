"""KV caches sized by the KV heads: the static per-layer cache and the paged cache. Storage only.

Both caches implement one small interface, and the model's own forward is the only code that uses it
(:meth:`gqa.GQAForCausalLM.forward` for prefill, decode and paged serving alike):

**Model-level cache** (what ``model(ids, cache=...)`` takes): ``len(cache)`` layers and ``cache[i]``, the
layer cache of layer i. :class:`ModelCache` (one :class:`KVCache` per layer, from ``model.make_cache``)
and :class:`PagedBatch` (``paged_cache.batch(seqs)``: some sequences of a :class:`PagedKVCache`, for one
forward) are the two.

**Layer cache** (what :class:`gqa.GroupedQueryAttention` calls), two methods:

* ``positions(t, device) -> LongTensor`` ``[T]`` or ``[B, T]``: RoPE positions of the next t tokens
  (the default when the caller passes none).
* ``update(k_new, v_new) -> kv``: store the new keys/values ``[B, Hkv, T, D]`` after what the cache holds
  and return what the T new queries attend over, new tokens included:

  - a static cache returns views ``(k, v)``, each ``[B, Hkv, Tk, D]``: one shared length, ragged batches
    left-padded (a key-padding mask hides the padding), the new queries are the last T keys;
  - a paged cache returns a :class:`PagedKV` (pages, block table, per-sequence lengths): each sequence
    has its own length and its new queries are its own last T tokens.

  Either way a mask applies bottom-right, per sequence. The attention layer turns ``kv`` into attention
  (``gqa.attention`` for ``(k, v)``, :func:`gqa.layer.paged_attention` for :class:`PagedKV`); no cache
  computes attention.

A layer cache records the new tokens as held when it is written (``KVCache.length``; a paged batch
advances its sequences at its first layer's write), so one forward is one step, with no commit call.
The cache holds Hkv heads per layer (never Hq); per-layer KV heads give per-layer sizes. A latent layer
(:class:`gqa.latent.LatentAttention`) has its own layer cache, :class:`LatentKVCache` (``update_rows``; a ring of
rows, :class:`RingLatentKVCache`, on a sliding-window layer).
"""

from gqa.cache.latent import LatentKVCache, RingLatentKVCache
from gqa.cache.paged import OutOfPages, PageAllocator, PagedBatch, PagedKV, PagedKVCache
from gqa.cache.static import KVCache, ModelCache, RingKVCache

__all__ = ["LatentKVCache", "RingLatentKVCache", "KVCache", "RingKVCache", "ModelCache", "PagedKVCache", "PagedBatch", "PagedKV", "PageAllocator", "OutOfPages"]
