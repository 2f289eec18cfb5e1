"""Perplexity and KL to a teacher, for gqa models and transformers models alike.

The token stream is cut into consecutive, non-overlapping windows of ``seq_len`` inputs; window i
feeds tokens ``[i*L, i*L + L)`` and scores the next token at each position, so every token after the
first is predicted exactly once (the first of each window with no earlier context, as in
nanoGPT/litgpt evaluation). Log-probabilities are computed in fp32 whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from gqa.data.tokenizer import encode
from gqa.errors import GQAUserError
from gqa.model.loading import model_context
from gqa.progress import progress as progress_bar

__all__ = ["EvalResult", "evaluate_lm", "perplexity", "kl_to_teacher", "model_logits", "as_token_ids"]


@dataclass
class EvalResult:
    """perplexity = exp(nll); nll in nats per token; kl: mean KL(teacher || model) per token, or None;
    top1_agreement: share of positions where the model's most likely next token is the teacher's, or None."""

    perplexity: float
    nll: float
    tokens: int
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> logits [B, T, vocab] for a gqa model (returns a tensor) or a transformers
    model (returns an output with ``.logits``; its KV cache is not built)."""
    from gqa.model import GQAForCausalLM

    if isinstance(model, GQAForCausalLM):
        return model(input_ids)
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def as_token_ids(data, tokenizer=None) -> torch.Tensor:
    """Text (needs ``tokenizer``), a list of ids or a 1-D tensor -> int64 ids [N] on CPU."""
    if isinstance(data, str):
        if tokenizer is None:
            raise GQAUserError("got text but no tokenizer; pass tokenizer= (the model's own) or token ids")
        ids = encode(tokenizer, data)
    else:
        ids = torch.as_tensor(data, dtype=torch.long).cpu()
    if ids.dim() != 1:
        raise GQAUserError(f"token ids must be 1-D [N], got shape {tuple(ids.shape)}; flatten them first")
    if ids.numel() < 2:
        raise GQAUserError(f"need at least 2 tokens to score one prediction, got {ids.numel()}; give more text")
    return ids


def _windows(
    ids: torch.Tensor, seq_len: int, batch_size: int, bos: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (inputs [b, L], targets [b, L]); a final shorter window comes alone. With ``bos`` every
    window's inputs start with it and its L targets are the next L text tokens (the first one included)."""
    if bos is not None:
        yield from _bos_windows(ids, seq_len, batch_size, bos)
        return
    n_full = (ids.numel() - 1) // seq_len
    if n_full:
        full = ids[: n_full * seq_len + 1]
        inputs = full[:-1].view(n_full, seq_len)  # (n_full, L)
        targets = full[1:].view(n_full, seq_len)  # (n_full, L)
        for i in range(0, n_full, batch_size):
            yield inputs[i : i + batch_size], targets[i : i + batch_size]
    rest = ids[n_full * seq_len :]
    if rest.numel() >= 2:
        yield rest[:-1].unsqueeze(0), rest[1:].unsqueeze(0)


def _bos_windows(ids: torch.Tensor, seq_len: int, batch_size: int, bos: int):
    n_full = ids.numel() // seq_len
    targets = ids[: n_full * seq_len].view(n_full, seq_len)  # (n_full, L)
    inputs = torch.cat([torch.full((n_full, 1), bos, dtype=ids.dtype), targets[:, :-1]], dim=1)
    for i in range(0, n_full, batch_size):
        yield inputs[i : i + batch_size], targets[i : i + batch_size]
    rest = ids[n_full * seq_len :]
    if rest.numel():
        yield torch.cat([ids.new_tensor([bos]), rest[:-1]]).unsqueeze(0), rest.unsqueeze(0)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def evaluate_lm(
    model,
    data,
    *,
    tokenizer=None,
    teacher=None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    bos_token_id: int | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``data`` and, with ``teacher``, the mean KL(teacher || model).

    model / teacher: a :class:`gqa.GQAForCausalLM` or a transformers causal LM (e.g. from
        ``AutoModelForCausalLM.from_pretrained(folder)``); the teacher must share the vocabulary.
    data: text (tokenized with ``tokenizer``), or token ids (list or 1-D tensor [N]).
    seq_len: tokens of context per window (default: 256, or the model's context if shorter; longer than the
        model's context is an error); batch_size: windows per forward pass.
    max_tokens: score at most this many tokens (the first ones), e.g. to bound CPU time.
    bos_token_id: put this token in front of every window, as models that need their BOS (Gemma) are fed
        (:func:`gqa.data.tokenizer.leading_bos` says which a tokenizer adds); the window's L targets are
        then L text tokens, the first one included.
    """
    contexts = [
        (ctx, role) for m, role in ((model, "the model"), (teacher, "the teacher")) if (ctx := model_context(m))
    ]
    if seq_len is None:  # the default window: 256 tokens, or the shortest context if that is shorter
        seq_len = min([256, *(ctx for ctx, _ in contexts)])
    if seq_len < 1 or batch_size < 1:
        raise GQAUserError(
            f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}; fix --seq-len/--batch-size"
        )
    for ctx, role in contexts:
        if seq_len > ctx:
            raise GQAUserError(f"seq_len {seq_len} is longer than {role}'s context of {ctx} tokens; use {ctx} or less")
    ids = as_token_ids(data, tokenizer)
    if max_tokens is not None:
        if max_tokens < 1:
            raise GQAUserError(f"max_tokens must be >= 1, got {max_tokens}; fix --max-tokens")
        ids = ids[: max_tokens + (bos_token_id is None)]  # with a BOS every text token is scored
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise GQAUserError(
            f"token id {int(ids.max())} is outside the model's vocabulary ({vocab}); use its own tokenizer"
        )
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    device = _device_of(model)
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    bar = progress_bar(
        total=ids.numel() - (bos_token_id is None),
        unit="tok",
        unit_scale=True,
        desc="eval",
        enabled=progress,
        leave=False,
    )
    try:
        for inputs, targets in _windows(ids, seq_len, batch_size, bos_token_id):
            inputs, targets = inputs.to(device), targets.to(device)
            logp = F.log_softmax(model_logits(model, inputs).float(), dim=-1)  # (b, L, V)
            nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            if teacher is not None:
                t_logits = model_logits(teacher, inputs.to(_device_of(teacher))).float().to(device)
                if t_logits.shape[-1] != logp.shape[-1]:
                    raise GQAUserError(
                        f"teacher vocabulary ({t_logits.shape[-1]}) differs from the model's ({logp.shape[-1]}); "
                        "use the original model the student was converted from"
                    )
                t_logp = F.log_softmax(t_logits, dim=-1)
                kl_sum += (t_logp.exp() * (t_logp - logp)).sum().item()
                agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            count += targets.numel()
            bar.update(targets.numel())
    finally:
        bar.close()
        model.train(was_training)
    nll = nll_sum / count
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        kl=kl_sum / count if teacher is not None else None,
        top1_agreement=agree / count if teacher is not None else None,
    )


def perplexity(
    model,
    data,
    *,
    tokenizer=None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    bos_token_id: int | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``data`` (text with ``tokenizer``, or token ids).

    Returns an :class:`EvalResult`: ``.perplexity``, ``.nll`` (nats/token), ``.tokens`` (tokens scored).
    See :func:`evaluate_lm` for the arguments; works for gqa and transformers models.
    """
    return evaluate_lm(
        model,
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        bos_token_id=bos_token_id,
    )


def kl_to_teacher(
    model,
    teacher,
    data,
    *,
    tokenizer=None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> float:
    """Mean per-token KL(teacher || model) in nats over ``data``: how far the model's next-token
    distribution is from the teacher's (0 for an identical model)."""
    res = evaluate_lm(
        model, data, tokenizer=tokenizer, teacher=teacher, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens
    )
    return res.kl
