"""KV caches sized by the KV heads: the static per-layer cache (paged cache: see the generate issue)."""

from gqa.cache.static import KVCache, ModelCache

__all__ = ["KVCache", "ModelCache"]
