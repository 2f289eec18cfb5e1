"""The continuous-batching scheduler: interleaved requests give the tokens each gives alone and the tokens
gqa.generate gives (greedy and sampled); EOS frees pages; bad requests are refused in one line."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa.generation import ContinuousBatcher
from helpers import tiny_gqa

REQUESTS = [  # (prompt length, new tokens, step at which it arrives)
    (7, 12, 0),
    (3, 5, 0),
    (12, 9, 1),
    (1, 14, 2),
    (5, 3, 2),
    (9, 10, 4),
    (4, 8, 9),
]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_interleaved_requests_equal_each_run_alone(sampled):
    model = tiny_gqa(2)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n, _, _ in REQUESTS]
    kw = dict(temperature=0.9, top_k=30, top_p=0.95) if sampled else {}

    def alone(i):
        b = ContinuousBatcher(model, num_pages=16, page_size=4, eos_token_id=None)
        b.submit(prompts[i], REQUESTS[i][1], seed=100 + i, **kw)
        return b.run()[0]

    # a pool too small for all requests at once: some must wait for others to finish
    batcher = ContinuousBatcher(model, num_pages=12, page_size=4, max_batch=4, eos_token_id=None)
    ids = {}
    while len(ids) < len(REQUESTS) or batcher.has_work:
        for i, (_, n_new, arrive) in enumerate(REQUESTS):
            if arrive == batcher.steps and i not in ids:
                ids[i] = batcher.submit(prompts[i], n_new, seed=100 + i, **kw)
        batcher.step()
        assert batcher.cache.num_free_pages >= 0
    reqs = {i: batcher.done[rid] for i, rid in ids.items()}
    for i, req in reqs.items():
        assert req.tokens == alone(i), f"request {i} differs when interleaved"
    # The scheduler gives gqa.generate's tokens: the same forward, and prompt i of a generate batch
    # seeded 100 samples from generator 100 + i, as request i does.
    longest = max(r[1] for r in REQUESTS)
    static = gqa.generate(model, prompts, max_new_tokens=longest, eos_token_id=None, seed=100, **kw).tokens
    for i, req in reqs.items():
        assert req.tokens == static[i][: REQUESTS[i][1]]
    assert batcher.peak_running >= 3  # several sequences decoded together
    assert any(r.started_step > r.submitted_step for r in reqs.values())  # someone waited for pages
    assert any(  # a request joined while another was mid-generation
        a.started_step > b.started_step and a.started_step < b.finished_step
        for a in reqs.values()
        for b in reqs.values()
    )
    assert batcher.peak_pages_used <= 12 and batcher.cache.num_free_pages == 12  # everything returned


def test_eos_frees_pages_and_errors():
    model = tiny_gqa(2)
    batcher = ContinuousBatcher(model, num_pages=4, page_size=4, eos_token_id=None)
    free = ContinuousBatcher(model, num_pages=8, page_size=4, eos_token_id=None)
    free.submit([1, 2, 3], 8)
    toks = free.run()[0]
    stopper = ContinuousBatcher(model, num_pages=8, page_size=4, eos_token_id=toks[2])
    stopper.submit([1, 2, 3], 8)
    assert stopper.run()[0] == toks[: toks.index(toks[2]) + 1]
    assert stopper.cache.num_free_pages == 8
    with pytest.raises(ValueError, match="pool has 4"):
        batcher.submit(list(range(10)), 10)  # 19 tokens need 5 pages of 4
    with pytest.raises(ValueError, match="empty"):
        batcher.submit([], 3)
    with pytest.raises(ValueError, match="context"):
        batcher.submit([1] * 90, 10)
    with pytest.raises(ValueError, match="top_p"):
        batcher.submit([1], 3, temperature=1.0, top_p=0)
