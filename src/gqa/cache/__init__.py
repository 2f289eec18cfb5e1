"""KV caches sized by the KV heads: the static per-layer cache and the paged cache."""

from gqa.cache.paged import OutOfPages, PageAllocator, PagedKVCache, paged_attention
from gqa.cache.static import KVCache, ModelCache

__all__ = ["KVCache", "ModelCache", "PagedKVCache", "PageAllocator", "OutOfPages", "paged_attention"]
