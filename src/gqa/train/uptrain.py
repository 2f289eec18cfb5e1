"""Uptraining: continued training of a converted model, for a token budget, a fraction of its
pre-training tokens or a time budget, optionally distilled from the original model (end-to-end
distillation: ``teacher=`` with ``distill_alpha=1`` is a pure KL to the original model's outputs).

The GQA paper (Ainslie et al., 2023) uptrains for about 5% of the original pre-training steps with the
language-model loss; the project's recipe instead starts from the locally distilled conversion and
distils end to end from the original for a few CPU-minutes (``max_minutes``), moving only the
attention parameters (``train_params="attention"``). Those are the defaults when a teacher is given
(:func:`uptrain_defaults`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gqa.errors import GQAUserError
from gqa.model import GQAForCausalLM
from gqa.train.config import TrainConfig
from gqa.train.loop import SUMMARY_NAME, TrainResult, train

__all__ = ["uptrain", "uptrain_tokens", "read_pretrain_tokens", "uptrain_defaults", "DISTILL_DEFAULTS", "LM_DEFAULTS"]

_OPEN_ENDED_STEPS = 10**9  # a time-budgeted run's step count: never reached, the clock stops it first

#: With a teacher: the best measured end-to-end distillation (SmolLM2 3 -> 1 KV heads after local distillation,
#: 10 CPU-minutes on english:calib: x1.164 of the original's held-out perplexity, against x1.189 with
#: ``lr=3e-4``; docs/results/recover-quality.md): pure KL to the teacher, attention parameters only, small
#: batches (more steps per minute).
DISTILL_DEFAULTS = {"train_params": "attention", "distill_alpha": 1.0, "lr": 1e-3, "batch_size": 4}
#: Without a teacher: language-model uptraining as in the GQA paper, every parameter moving.
LM_DEFAULTS = {"train_params": "all", "lr": 5e-4, "batch_size": 16}


def uptrain_defaults(teacher: bool) -> dict:
    """The :class:`TrainConfig` settings :func:`uptrain` (and ``gqa uptrain``) use unless told otherwise:
    :data:`DISTILL_DEFAULTS` with a teacher, :data:`LM_DEFAULTS` without one."""
    return dict(DISTILL_DEFAULTS if teacher else LM_DEFAULTS)


def read_pretrain_tokens(model_dir: str | Path) -> int | None:
    """Tokens a model was pretrained on, from the ``training.json`` that ``gqa pretrain`` writes (or None)."""
    path = Path(model_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if info.get("kind") == "pretrain":
        return int(info["tokens"])
    return info.get("pretrain_tokens")


def uptrain_tokens(tokens: int | None = None, fraction: float | None = None, pretrain_tokens: int | None = None) -> int:
    """The uptraining token budget: ``tokens``, or ``fraction`` (in (0, 1]) of ``pretrain_tokens``."""
    if (tokens is None) == (fraction is None):
        raise GQAUserError(
            "give exactly one of --tokens N or --fraction A (e.g. --fraction 0.05 for 5%), or a time budget --max-minutes M"
        )
    if tokens is not None:
        if tokens < 1:
            raise GQAUserError(f"--tokens must be >= 1, got {tokens}")
        return int(tokens)
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise GQAUserError(f"--fraction must be in (0, 1], got {fraction}; e.g. 0.05 uptrains on 5% of pre-training")
    if not pretrain_tokens:
        raise GQAUserError("--fraction needs the pre-training token count: pass --pretrain-tokens N (or use --tokens)")
    return max(1, round(fraction * pretrain_tokens))


def uptrain(
    model: GQAForCausalLM,
    train_ids,
    out_dir: str | Path,
    *,
    tokens: int | None = None,
    fraction: float | None = None,
    pretrain_tokens: int | None = None,
    max_minutes: float | None = None,
    teacher=None,
    val_ids=None,
    resume: bool = False,
    tokenizer_from: str | Path | None = None,
    device=None,
    progress: bool = True,
    summary: dict | None = None,
    on_step_end=None,
    **train_settings,
) -> TrainResult:
    """Continue training ``model`` (e.g. just converted to fewer KV heads) for a token budget.

    tokens / fraction / pretrain_tokens: the budget, see :func:`uptrain_tokens`; it is rounded up to
        whole optimizer steps of ``batch_size x seq_len`` tokens.
    max_minutes: a time budget (minutes of training, evaluation excluded), alone or with a token
        budget (whichever ends first); the run stops cleanly with its model, metrics and training.json
        written, and the learning rate's cosine follows the time used.
    teacher: the original model (same vocabulary) to distil from; ``distill_alpha`` weights the KL.
    train_settings: any :class:`TrainConfig` field (lr, batch_size, seq_len, grad_accum, seed, ...);
        those not given take :func:`uptrain_defaults` (the measured best distillation with a teacher:
        ``distill_alpha=1``, ``train_params="attention"``, ``lr=1e-3``, ``batch_size=4``; else
        ``train_params="all"``, ``lr=5e-4``, ``batch_size=16``). ``warmup_steps`` defaults to 10% of the steps.
    Other arguments as for :func:`gqa.train.train`.
    """
    if max_minutes is not None and not (max_minutes > 0 and math.isfinite(max_minutes)):
        raise GQAUserError(f"--max-minutes must be a positive number, got {max_minutes}")
    budget = (
        uptrain_tokens(tokens, fraction, pretrain_tokens)
        if (tokens, fraction) != (None, None) or not max_minutes
        else None
    )
    settings = {"min_lr_ratio": 0.1, "checkpoint_every": 25, **uptrain_defaults(teacher is not None), **train_settings}
    settings["max_minutes"] = float(max_minutes or 0.0)
    if budget is None:  # time budget only: steps are open-ended, the clock ends the run
        config = TrainConfig(**{"warmup_steps": 1, **settings, "steps": _OPEN_ENDED_STEPS})
    else:
        config = TrainConfig.for_tokens(budget, **{**settings, "warmup_steps": settings.get("warmup_steps", 0)})
        if "warmup_steps" not in train_settings:
            config = TrainConfig.from_dict({**config.to_dict(), "warmup_steps": max(1, config.steps // 10)})
    info = {
        "kind": "uptrain",
        "requested_tokens": budget,
        "fraction": fraction,
        "pretrain_tokens": pretrain_tokens,
        "max_minutes": max_minutes,
    }
    return train(
        model,
        train_ids,
        out_dir,
        config,
        teacher=teacher,
        val_ids=val_ids,
        resume=resume,
        tokenizer_from=tokenizer_from,
        device=device,
        progress=progress,
        summary={**info, **(summary or {})},
        on_step_end=on_step_end,
        desc="uptrain",
    )
