"""Generation: sampling, batched generation with the static KV cache, a paged-cache forward and a
continuous-batching scheduler.

* :func:`generate` — a batch of prompts (left-padded) with the static cache; streaming via ``on_token``.
* :class:`ContinuousBatcher` — requests join and finish mid-batch over a :class:`gqa.cache.PagedKVCache`.
* :func:`paged_forward` — one model forward that reads/writes a paged cache.
"""

from gqa.generation.paged import paged_forward
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
    "paged_forward",
]
