"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Every sequence may carry its own ``torch.Generator``, so a sequence samples the same tokens whether
it runs alone or inside any batch (the continuous-batching scheduler relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError
from gqa.units import SEED_LIMIT, check_seed

__all__ = ["SamplingParams", "sample", "filter_logits"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 picks the argmax (greedy); > 0 divides the logits before sampling.
    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
    seed: seeds the sampler (None = nondeterministic); ignored when greedy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or t == float("inf"):
            raise GQAUserError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise GQAUserError(f"top_k must be an integer >= 0 (0 = no limit), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise GQAUserError(f"top_p must be in (0, 1] (1 = no limit), got {p!r}")
        if self.seed is not None:
            check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, offset: int = 0) -> torch.Generator | None:
        """A CPU generator seeded with ``seed + offset`` (one per sequence), or None when unseeded/greedy."""
        if self.greedy or self.seed is None:
            return None
        gen = torch.Generator()
        gen.manual_seed((self.seed + offset) % SEED_LIMIT)  # sequence i of a run seeded near 2^64 wraps
        return gen


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of tokens outside top-k / top-p to -inf. logits [B, V] (float) -> [B, V].

    The most likely token always survives, so every row keeps at least one candidate.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits [B, V] -> token ids [B] (int64).

    generators: one per row (or None for the global RNG); row b draws only from ``generators[b]``.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    device = logits.device
    # float64, and each row's maximum shifted to 0 before dividing (softmax does not change): a tiny
    # temperature (down to 5e-324; fp32 rounds 1e-46 to 0) then sends the other logits to -inf instead of
    # the maximum to inf, where softmax would give NaN.
    logits = logits.double()
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
    scores = filter_logits(shifted / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scores, dim=-1).cpu()  # (B, V); generators are CPU generators
    if generators is None or all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1).to(device)
    rows = [torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(rows).to(device)
