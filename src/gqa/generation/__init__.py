"""Generation over the model's own forward: sampling, batched generation with the static KV cache and a
continuous-batching scheduler over the paged cache.

* :func:`generate` — a batch of prompts (left-padded) with the static cache; streaming via ``on_token``.
* :class:`ContinuousBatcher` — requests join and finish mid-batch over a :class:`gqa.cache.PagedKVCache`.

Both run ``model(ids, cache=..., logits_to_keep=1)``: :meth:`gqa.GQAForCausalLM.forward` is the one
forward, whatever the cache.
"""

from gqa.generation.sampling import SamplingParams, filter_logits, sample
from gqa.generation.scheduler import ContinuousBatcher, Request
from gqa.generation.static import GenerationResult, generate, prepare_prompts

__all__ = [
    "generate",
    "GenerationResult",
    "prepare_prompts",
    "SamplingParams",
    "sample",
    "filter_logits",
    "ContinuousBatcher",
    "Request",
]
