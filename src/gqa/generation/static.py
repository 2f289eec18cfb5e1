"""Batched generation with the static KV cache: left-padded prefill, then one token per step.

A batch of prompts of different lengths is left-padded to the longest, so every sequence's newest
token sits in the same cache slot and one ``[B, 1]`` forward decodes all of them. Padding slots are
masked out with ``key_valid`` and RoPE positions count only real tokens, so a padded prompt gives the
same logits as the prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gqa import masks
from gqa.errors import GQAUserError
from gqa.generation.dynamic import DynamicOptions, dynamic_prefill, resolve_grouping
from gqa.generation.sampling import SamplingParams, sample

__all__ = ["generate", "GenerationResult", "prepare_prompts", "eos_ids"]

TokenCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    tokens: new token ids per prompt (prompt excluded; stops after EOS, which is included).
    texts: the decoded new text per prompt when a tokenizer was given, else None.
    prompt_lengths: prompt tokens per prompt.
    prefill_s / decode_s: wall time of the prefill forward and of all decode steps.
    decode_steps: forward passes after the prefill.
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    texts: list[str] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    finished: list[bool] = field(default_factory=list)
    grouping: list | None = None  # grouping="dynamic": per prompt, per layer, a gqa.generation.dynamic.LayerGrouping

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps per second, summed over the batch."""
        produced = sum(max(len(t) - 1, 0) for t in self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


def eos_ids(model, eos_token_id) -> set[int]:
    """The EOS ids to stop on: ``eos_token_id`` if given ("model" = the model config's, None = never stop)."""
    if isinstance(eos_token_id, str) and eos_token_id == "model":
        eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def prepare_prompts(prompts, tokenizer=None, *, add_bos: bool = False) -> list[list[int]]:
    """Normalise prompts to a list of token-id lists.

    Accepts a string or list of strings (needs ``tokenizer``), a list of ids, a list of id lists, or an
    int tensor ``[T]`` / ``[B, T]`` (no padding).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dim() not in (1, 2):
            raise GQAUserError(
                f"prompt tensor must be int ids [T] or [B, T], got {tuple(prompts.shape)} {prompts.dtype}"
            )
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise GQAUserError("give at least one prompt")
    if all(isinstance(p, int) for p in prompts):
        prompts = [list(prompts)]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise GQAUserError("text prompts need a tokenizer; pass tokenizer= or token ids")
            if not p:
                raise GQAUserError(f"prompt {i} is empty; give some text to continue")
            ids = tokenizer.encode(p, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(p)
            ids = list(ids)
            bos = getattr(tokenizer, "bos_token_id", None)
            if add_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        elif isinstance(p, torch.Tensor):
            ids = p.tolist()
        else:
            ids = list(p)
        if not ids:
            raise GQAUserError(f"prompt {i} is empty; give at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise GQAUserError(f"prompt {i} must hold integer token ids; pass lists of ints or an int tensor")
        out.append(ids)
    return out


def _check_ids(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GQAUserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    vocab = model.config.vocab_size
    context = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise GQAUserError(f"prompt {i} has token ids outside the vocabulary 0..{vocab - 1}; check the tokenizer")
        if len(p) + max_new_tokens > context:
            raise GQAUserError(
                f"prompt {i} has {len(p)} token{'s' * (len(p) != 1)}; with {max_new_tokens} new tokens that exceeds "
                f"the model's context of {context}; shorten the prompt or lower max_new_tokens"
            )


def _all_causal(model) -> bool:
    """Whether every layer's default mask is plain causal (no sliding-window layer)."""
    config = model.config
    window = getattr(config, "layer_window", None)
    n_layers = len(getattr(config, "kv_heads_per_layer", ()) or ())
    return window is not None and n_layers > 0 and all(window(i) is None for i in range(n_layers))


@torch.inference_mode()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | str | None = "model",
    tokenizer=None,
    on_token: TokenCallback | None = None,
    grouping: str | DynamicOptions = "static",
    kv_fraction: float | None = None,
    max_error: float | None = None,
) -> GenerationResult:
    """Generate continuations for a batch of prompts with the static KV cache.

    Args:
        model: a :class:`gqa.GQAForCausalLM` (any per-layer KV heads; the cache holds Hkv heads per layer).
        prompts: text (with ``tokenizer``), token ids, or a list of either; lengths may differ.
        max_new_tokens: tokens to generate per prompt (fewer when EOS comes first).
        temperature, top_k, top_p, seed: see :class:`SamplingParams`; temperature 0 is greedy.
            With a seed, prompt b samples from its own generator seeded ``seed + b``.
        eos_token_id: stop a sequence after this token; "model" uses ``model.config.eos_token_id``,
            None never stops early.
        tokenizer: encodes text prompts and decodes ``texts`` in the result.
        on_token: called as ``on_token(prompt_index, token_id)`` for each new token as it is produced
            (streaming).
        grouping: "static" (the model's own KV heads) or "dynamic": after the prefill, each prompt's KV heads
            are clustered per layer on that prompt and decode reads one merged K/V per cluster
            (:mod:`gqa.generation.dynamic`), at ``kv_fraction`` of the KV bytes or under ``max_error``; or
            ``gqa.generation.dynamic.options(...)`` for the remaining choices (e.g. ``values="keep"``).

    Prompts are left-padded to the longest: the cache is ``[B, Hkv, T_prompt + max_new_tokens, D]``
    per layer, ``key_valid`` masks the padding slots and RoPE positions skip them. Every step is the
    model's own forward (``model(ids, cache=..., logits_to_keep=1)``).
    """
    params = SamplingParams(temperature, top_k, top_p, seed)
    ids = prepare_prompts(prompts, tokenizer)
    _check_ids(model, ids, max_new_tokens)
    stop = eos_ids(model, eos_token_id)
    device = next(model.parameters()).device
    b = len(ids)
    lengths = torch.tensor([len(p) for p in ids], device=device)
    t = int(lengths.max())
    pad = t - lengths  # (B,) left padding per prompt
    input_ids = torch.zeros(b, t, dtype=torch.long, device=device)
    for i, p in enumerate(ids):
        input_ids[i, t - len(p) :] = torch.tensor(p, device=device)
    slots = torch.arange(t, device=device)
    valid = slots[None, :] >= pad[:, None]  # (B, T) True on real tokens
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T) RoPE positions, 0 at each prompt's start
    ragged = bool((pad > 0).any())
    gens = [params.make_generator(i) for i in range(b)]

    dynamic = resolve_grouping(grouping, kv_fraction, max_error)
    cache = model.make_cache(b, t + max_new_tokens) if dynamic is None else None
    result = GenerationResult(tokens=[[] for _ in range(b)], prompt_lengths=[len(p) for p in ids])
    finished = [False] * b

    # Decode steps of a padded batch: every layer causal over the cache, the first pad[b] slots hidden, as a
    # mask of [B] starts (the CPU decode kernel takes them as an argument). Models with sliding-window
    # layers keep key_valid, which the model indexes to each ring buffer's slots.
    pad_mask = None
    if ragged and _all_causal(model):
        pad_mask = masks.causal() & masks.key_padding(start=pad)
    # Without padding the cache's own slot positions are the RoPE positions and no padding mask is needed.
    step_kw = dict(positions=positions, key_valid=valid) if ragged else {}
    t0 = time.perf_counter()
    if dynamic is None:
        logits = model(input_ids, cache=cache, logits_to_keep=1, **step_kw)  # (B, 1, vocab)
    else:
        cache, logits, result.grouping, _ = dynamic_prefill(
            model, input_ids, pad, t + max_new_tokens, dynamic, **step_kw
        )
    nxt = sample(logits[:, -1], params, gens)  # (B,)
    result.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        for i, tok in enumerate(nxt.tolist()):
            if finished[i]:
                continue
            result.tokens[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in stop:
                finished[i] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        if ragged:
            if pad_mask is not None:  # the padding as [B] starts: nothing per step grows with the context
                step_kw = dict(positions=(lengths + step)[:, None], mask=pad_mask)  # (B, 1) next position of each
            else:
                valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)  # (B, Tk)
                step_kw = dict(positions=(lengths + step)[:, None], key_valid=valid)
        logits = model(nxt[:, None], cache=cache, logits_to_keep=1, **step_kw)  # (B, 1, vocab)
        nxt = sample(logits[:, -1], params, gens)
        result.decode_steps += 1
    result.decode_s = time.perf_counter() - t0
    result.finished = finished
    if tokenizer is not None:
        result.texts = [tokenizer.decode(toks, skip_special_tokens=True) for toks in result.tokens]
    return result
