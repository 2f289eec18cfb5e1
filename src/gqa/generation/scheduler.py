"""Continuous batching over a paged KV cache: requests join and finish mid-batch.

Each :meth:`ContinuousBatcher.step`:

1. admits waiting requests in arrival order while the batch has room and the pool can hold every
   admitted request at its longest (prompt + max_new_tokens - 1 tokens); a request that does not fit
   waits, and so do the ones behind it (no starvation of long requests);
2. prefills each newly admitted prompt on its own (no padding) and samples its first token;
3. decodes one token for every running sequence in one ``[B, 1]`` forward over the paged cache;
   prefill and decode are the model's own forward, ``model(ids, cache=paged_cache.batch(seqs))``;
4. releases the pages of finished sequences, so waiting requests can join on the next step.

Pages are allocated lazily (a sequence holds ``ceil(length / page_size)`` pages, wasting less than
one page) but admission counts each request's worst case, so a running sequence never runs out of
pages and no sequence's pages are ever handed to another while it is alive. Every request samples
from its own generator, so its tokens do not depend on which other requests share its batches.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gqa.cache.dynamic import PagedDynamicKVCache
from gqa.cache.paged import PagedKVCache
from gqa.errors import GQAUserError
from gqa.generation.dynamic import (
    DynamicOptions,
    check_paged,
    paged_dynamic_cache,
    paged_dynamic_prefill,
    resolve_grouping,
)
from gqa.generation.sampling import SamplingParams, sample
from gqa.generation.static import eos_ids

__all__ = ["ContinuousBatcher", "Request"]


@dataclass
class Request:
    """One generation request and its progress."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> running -> done
    submitted_step: int = 0
    started_step: int | None = None
    finished_step: int | None = None
    grouping: list | None = None  # dynamic grouping: per layer, the gqa.generation.dynamic.LayerGrouping of its prompt

    @property
    def max_kv_tokens(self) -> int:
        """Tokens this request may ever hold in the cache (its last sampled token is never fed back)."""
        return len(self.prompt) + self.max_new_tokens - 1


class ContinuousBatcher:
    """A simple serving loop: submit requests at any time, call :meth:`step` (or :meth:`run`).

    Args:
        model: a :class:`gqa.GQAForCausalLM`.
        num_pages, page_size: the paged KV pool (``PagedKVCache.for_model``); or pass ``cache``.
        max_batch: most sequences decoded together (None = as many as the pool admits).
        eos_token_id: stop token(s); "model" uses the model config's, None never stops early.
        grouping, kv_fraction: "static" (the model's KV heads in the pages) or "dynamic" (issue 25): each
            admitted prompt is prefilled with every head, its KV heads are clustered per layer on that prompt
            (:mod:`gqa.generation.dynamic`) and the pages hold one merged K/V per cluster,
            ``floor(kv_fraction * Hkv)`` slots per layer (a :class:`gqa.cache.dynamic.PagedDynamicKVCache`);
            decode reads each sequence through its own head map. Paged dynamic grouping takes kv_fraction
            (not max_error) and merges V as well.
    """

    def __init__(
        self,
        model,
        *,
        num_pages: int | None = None,
        page_size: int = 16,
        max_batch: int | None = None,
        cache: PagedKVCache | None = None,
        eos_token_id: int | list[int] | str | None = "model",
        grouping: str | DynamicOptions = "static",
        kv_fraction: float | None = None,
    ):
        self.dynamic = resolve_grouping(grouping, kv_fraction)
        if self.dynamic is not None:
            check_paged(self.dynamic)
        if cache is None:
            if num_pages is None:
                raise GQAUserError("give num_pages (pool size) or a PagedKVCache as cache=")
            if self.dynamic is None:
                cache = PagedKVCache.for_model(model, num_pages, page_size)
            else:
                cache = paged_dynamic_cache(model, self.dynamic, num_pages, page_size)
        elif (self.dynamic is not None) != isinstance(cache, PagedDynamicKVCache):
            raise GQAUserError(
                "dynamic grouping needs a PagedDynamicKVCache (gqa.generation.dynamic.paged_dynamic_cache) and static "
                "grouping a PagedKVCache; pass num_pages instead of cache= to build the right one"
            )
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise GQAUserError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.model = model
        self.cache = cache
        self.max_batch = max_batch
        self.stop = eos_ids(model, eos_token_id)
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.done: dict[int, Request] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.peak_running = 0
        self.peak_pages_used = 0

    def _pages_needed(self, req: Request) -> int:
        return self.cache.pages_for(req.max_kv_tokens)

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> int:
        """Queue a request (token ids); returns its id. Its tokens are in ``done[id].tokens`` when done."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GQAUserError("the prompt is empty; give at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GQAUserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        vocab, context = self.model.config.vocab_size, self.model.config.max_seq_len
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GQAUserError(f"the prompt has token ids outside the vocabulary 0..{vocab - 1}")
        if len(prompt) + max_new_tokens > context:
            raise GQAUserError(
                f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the model's context of {context}; "
                "shorten the prompt or lower max_new_tokens"
            )
        req = Request(next(self._ids), prompt, max_new_tokens, params, submitted_step=self.steps)
        need = self._pages_needed(req)
        if need > self.cache.num_pages:
            raise GQAUserError(
                f"a request of {req.max_kv_tokens} tokens needs {need} pages but the pool has "
                f"{self.cache.num_pages}; give the cache more pages or lower max_new_tokens"
            )
        req.generator = params.make_generator()
        self.waiting.append(req)
        return req.id

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _emit(self, req: Request, token: int, on_token) -> None:
        req.tokens.append(token)
        if on_token is not None:
            on_token(req.id, token)
        if token in self.stop or len(req.tokens) >= req.max_new_tokens:
            req.state = "done"
            req.finished_step = self.steps

    def _retire(self) -> None:
        for req in [r for r in self.running if r.state == "done"]:
            self.cache.release(req.id)
            self.running.remove(req)
            self.done[req.id] = req

    def _admit(self, on_token) -> None:
        committed = sum(self._pages_needed(r) for r in self.running)
        while self.waiting:
            if self.max_batch is not None and len(self.running) >= self.max_batch:
                return
            req = self.waiting[0]
            if committed + self._pages_needed(req) > self.cache.num_pages:
                return  # wait until running requests finish and free their pages
            self.waiting.popleft()
            committed += self._pages_needed(req)
            req.state, req.started_step = "running", self.steps
            self.running.append(req)
            if self.dynamic is not None:
                logits, req.grouping, _ = paged_dynamic_prefill(
                    self.model, self.cache, req.id, req.prompt, self.dynamic
                )
            else:
                self.cache.add_sequence(req.id)
                self.cache.reserve(req.id, len(req.prompt))
                ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)  # (1, T)
                logits = self.model(ids, cache=self.cache.batch([req.id]), logits_to_keep=1)  # (1, 1, vocab)
            self._emit(req, int(sample(logits[:, -1], req.params, [req.generator])[0]), on_token)

    @torch.inference_mode()
    def step(self, on_token: Callable[[int, int], None] | None = None) -> None:
        """Admit and prefill what fits, then decode one token for every running sequence."""
        self._admit(on_token)
        self._retire()
        self.peak_running = max(self.peak_running, len(self.running))
        if self.running:
            seqs = [r.id for r in self.running]
            for s in seqs:
                self.cache.reserve(s, 1)  # cannot fail: admission counted every request's worst case
            self.peak_pages_used = max(self.peak_pages_used, self.cache.num_pages - self.cache.num_free_pages)
            last = torch.tensor([[r.tokens[-1]] for r in self.running], dtype=torch.long, device=self.device)  # (B, 1)
            logits = self.model(last, cache=self.cache.batch(seqs), logits_to_keep=1)[:, -1]  # (B, vocab)
            greedy = logits.argmax(dim=-1).tolist()  # one batched argmax; sampled rows draw on their own
            for b, req in enumerate(self.running):
                tok = greedy[b] if req.params.greedy else int(sample(logits[b : b + 1], req.params, [req.generator])[0])
                self._emit(req, tok, on_token)
            self._retire()
        self.steps += 1

    def run(self, on_token: Callable[[int, int], None] | None = None) -> dict[int, list[int]]:
        """Step until every submitted request is done; returns ``{request id: new tokens}``."""
        while self.has_work:
            self.step(on_token)
        return {i: r.tokens for i, r in sorted(self.done.items())}
