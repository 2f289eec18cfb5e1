"""The training loop shared by ``gqa pretrain`` and ``gqa uptrain``.

AdamW with linear warm-up and cosine decay, gradient accumulation, optional distillation from a
teacher, bf16 autocast on GPU, a progress bar with loss and tokens/s, metrics as JSON Lines, atomic
checkpoints with exact resume, and DDP / FSDP2 under torchrun.

Determinism: the windows of optimizer step s are drawn from a generator seeded with (seed, s), and
the learning rate is a function of s; a checkpoint stores model + optimizer state and s. A resumed
run therefore takes exactly the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gqa.atomic import write_json_atomic
from gqa.errors import GQAUserError
from gqa.evaluate import EvalResult, evaluate_lm, model_logits
from gqa.formats.transformers import SIDE_FILES
from gqa.model import GQAConfig, GQAForCausalLM, save_hf
from gqa.model.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gqa.provenance import provenance
from gqa.train.config import TrainConfig
from gqa.train.distributed import DistInfo, full_state, init_distributed, load_full_state, unwrap
from gqa.train.distributed import wrap_model as _wrap
from gqa.train.rundir import (
    METRICS_NAME,
    RUN_MARKER,
    SUMMARY_NAME,
    _acquire_lock,
    _clean_partials,
    _release_lock,
    check_not_inside,
    check_out_dir,
    read_metrics,
)
from gqa.units import derived_seed

__all__ = [
    "TrainResult",
    "train",
    "batch_offsets",
    "check_out_dir",
    "check_not_inside",
    "set_trainable",
    "read_metrics",
    "METRICS_NAME",
    "SUMMARY_NAME",
    "RUN_MARKER",
]


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float
    elapsed_s: float
    validation: EvalResult | None = None
    history: list[dict] = field(default_factory=list)
    stopped_by_time: bool = False  # the run ended at its time budget (max_minutes)
    best_step: int | None = None  # the step whose weights were kept (keep_best), None: the last one


def batch_offsets(n_tokens: int, config: TrainConfig, step: int) -> torch.Tensor:
    """Start offsets [batch_size] of the windows of optimizer step ``step`` (same on every process)."""
    g = torch.Generator().manual_seed(derived_seed(config.seed, step))
    return torch.randint(0, n_tokens - config.seq_len, (config.batch_size,), generator=g)


def _window_batch(ids: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([ids[o : o + seq_len + 1] for o in offsets.tolist()])  # (b, L+1)
    return rows[:, :-1], rows[:, 1:]


#: What ``--train kv`` moves: the K/V projections of a GQA layer, the latent, its rotated keys and the K/V
#: up-projections of a latent one (:mod:`gqa.latent`).
_KV_MODULES = ("k_proj", "v_proj", "kv_down", "k_rope_proj", "k_up", "v_up")


def set_trainable(model: torch.nn.Module, which: str) -> dict:
    """Freeze every parameter except ``which`` ("all", "attention": every ``*.attn.*``, "kv": the K and V
    projections); returns the previous ``requires_grad`` flags by name (to restore them)."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        if which == "all":
            keep = True
        elif which == "attention":
            keep = ".attn." in f".{name}"
        else:
            keep = any(f".attn.{m}." in f".{name}" for m in _KV_MODULES)
        p.requires_grad_(keep and before[name])
    if not any(p.requires_grad for p in model.parameters()):
        raise GQAUserError(f"--train {which} leaves no parameter to train in this model; use --train all")
    return before


def _vocab(model) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def _autocast(config: TrainConfig, device: torch.device):
    use = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _save_model_files(model: GQAForCausalLM, out_dir: Path, tokenizer_from: str | Path | None) -> None:
    """Write the transformers folder files (config, weights, tokenizer) into ``out_dir``, each atomically; a
    latent model (no transformers layout yet) as gqa's checkpoint.pt and gqa_config.json instead."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out_dir))
    try:
        if getattr(model.config, "latent_rank", None) is not None:
            from gqa.model.checkpoint import save_gqa_model

            staged = save_gqa_model(model, tmp / "m", side_files_from=tokenizer_from)
        else:
            staged = save_hf(model, tmp / "m", side_files_from=tokenizer_from)
        for f in staged.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(
    model: GQAForCausalLM,
    train_ids: torch.Tensor,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    teacher=None,
    val_ids: torch.Tensor | None = None,
    resume: bool = False,
    tokenizer_from: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    summary: dict | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on windows of ``train_ids`` and write the result to ``out_dir``.

    model: a :class:`gqa.GQAForCausalLM` (any KV-head layout; query head h uses KV head h // g).
    train_ids: int64 token ids [N], N >= seq_len + 1. val_ids: ids [M] for validation perplexity.
    teacher: a gqa or transformers causal LM with the same vocabulary; adds distillation
        (``config.distill_alpha`` weight on T^2 x KL(teacher_T || model_T)).
    out_dir: must not exist (or, with ``resume``, hold the ``checkpoint.pt`` of an unfinished run).
        Receives metrics.jsonl and checkpoint.pt while training; at the end the model as a
        transformers folder (config.json, model.safetensors, tokenizer files from ``tokenizer_from``)
        and training.json (configs, numbers, provenance); the checkpoint is then removed.
    on_step_end(step, record): called after each optimizer step (tests use it to interrupt a run).
    Under torchrun, call on every process with the same arguments.
    """
    out_dir = Path(out_dir)
    train_ids, val_ids = _checked_inputs(model, train_ids, val_ids, teacher, config)
    info: DistInfo = init_distributed(device)
    if config.micro_batch % info.world_size:
        raise GQAUserError(
            f"batch_size / grad_accum = {config.micro_batch} sequences per micro-step do not split over "
            f"{info.world_size} processes; make it a multiple of the process count"
        )
    lock = None
    if info.is_main:
        check_out_dir(out_dir, resume)
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _acquire_lock(out_dir)  # released (and the marker removed on success) in the finally below
    finished = False
    restore_flags = None
    try:
        if info.is_main:
            _prepare_out_dir(out_dir, tokenizer_from)
        fingerprints = _run_fingerprints(train_ids, val_ids, teacher)
        state = _resume_state(out_dir, resume, model, config, fingerprints)
        restore_flags = set_trainable(model, config.train_params)
        result = _run(
            model, train_ids, out_dir, config, info, state, fingerprints,
            teacher=teacher, val_ids=val_ids, tokenizer_from=tokenizer_from, progress=progress,
            summary=summary, on_step_end=on_step_end, desc=desc,
        )  # fmt: skip
        finished = True
        return result
    finally:
        if restore_flags is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(restore_flags.get(name, True))
        if info.is_main:
            _release_lock(lock, out_dir, finished)


def _checked_inputs(
    model, train_ids, val_ids, teacher, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training ids [N] and validation ids [M] (or None) as int64 on CPU, refused with one line when
    they cannot train ``model`` (too short, outside its vocabulary) or the teacher's vocabulary differs."""
    train_ids = torch.as_tensor(train_ids, dtype=torch.long).cpu()
    if train_ids.dim() != 1:
        raise GQAUserError(f"train_ids must be 1-D [N], got shape {tuple(train_ids.shape)}")
    if train_ids.numel() < config.seq_len + 1:
        raise GQAUserError(
            f"training data has {train_ids.numel()} tokens, fewer than seq_len + 1 = {config.seq_len + 1}; "
            "give more text or a smaller --seq-len"
        )
    vocab = model.config.vocab_size
    if int(train_ids.max()) >= vocab:
        raise GQAUserError(
            f"token id {int(train_ids.max())} is outside the model's vocabulary ({vocab}); use its tokenizer"
        )
    if teacher is not None and _vocab(teacher) not in (None, vocab):
        raise GQAUserError(
            f"teacher vocabulary ({_vocab(teacher)}) differs from the model's ({vocab}); "
            "distil from the original model the student was converted from"
        )
    if val_ids is not None:
        val_ids = torch.as_tensor(val_ids, dtype=torch.long).cpu()
        if val_ids.numel() < 2:
            raise GQAUserError("validation data has fewer than 2 tokens; give more validation text")
    return train_ids, val_ids


def _prepare_out_dir(out_dir: Path, tokenizer_from: str | Path | None) -> None:
    """Remove a killed run's temporary files; copy the tokenizer files (so checkpoints in OUT can be
    evaluated before the run ends)."""
    _clean_partials(out_dir)
    if tokenizer_from is not None:
        for name in SIDE_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, out_dir / name)


def _resume_state(out_dir: Path, resume: bool, model, config: TrainConfig, fingerprints: dict) -> dict | None:
    """The checkpoint to resume from, checked against this run's model config, settings and inputs; None
    for a new run, and for a run killed before its first checkpoint (--resume restarts it from step 0)."""
    path = out_dir / CHECKPOINT_NAME
    state = load_checkpoint(path) if resume and path.is_file() else None
    if state is None:
        return None
    if state["model_config"] != model.config.to_dict():
        raise GQAUserError(f"{path} was written for another model config; resume with that model")
    saved = TrainConfig.from_dict(state["train_config"])
    if saved != config:
        diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
        raise GQAUserError(
            f"training settings differ from the checkpoint's ({', '.join(diff)}); resume with the same ones"
        )
    _check_same_inputs(state.get("inputs"), fingerprints, out_dir)
    return state


def _run_fingerprints(train_ids: torch.Tensor, val_ids: torch.Tensor | None, teacher) -> dict:
    """Fingerprints of what a run reads besides its settings: the training and validation token ids
    [N] / [M], and the teacher's weights (names, shapes and float64 sums: cheap next to one training
    step, and any other model differs). Stored in each checkpoint, so a resume on other inputs is refused."""

    def ids(t):
        return None if t is None else hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]

    teacher_id = None
    if teacher is not None:
        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in teacher.state_dict().items():
                h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(p.double().sum()) if p.numel() else 0.0!r}".encode())
        teacher_id = h.hexdigest()[:16]
    return {"train data": ids(train_ids), "validation data": ids(val_ids), "teacher": teacher_id}


def _check_same_inputs(saved: dict | None, now: dict, out_dir: Path) -> None:
    """Refuse a resume whose data or teacher differ from the checkpoint's (checkpoints from before
    fingerprints existed carry none and are accepted)."""
    if saved is None:
        return
    changed = [k for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise GQAUserError(
            f"the {' and the '.join(changed)} differ from those {out_dir} was trained on; resume with the same "
            "--data, --val-data and --teacher, or start a new run in another OUT"
        )


@dataclass
class _Run:
    """One run's state between optimizer steps: what :func:`train` was given and what the steps change."""

    model: GQAForCausalLM  # the caller's model: its config names the output
    wrapped: torch.nn.Module  # DDP / FSDP2 around ``model``, or ``model`` itself in one process
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    info: DistInfo
    train_ids: torch.Tensor  # [N] int64 on CPU
    out_dir: Path
    fingerprints: dict
    teacher: object = None
    val_ids: torch.Tensor | None = None  # [M] int64 on CPU
    done: int = 0  # optimizer steps taken (a resumed run starts at its checkpoint's step)
    best: dict | None = None  # {"step", "perplexity", "model"}: the best periodic evaluation so far (keep_best)
    history: list[dict] = field(default_factory=list)  # the metrics records written (rank 0)
    prior_elapsed: float = 0.0  # wall seconds of the runs before a resume
    train_seconds: float = 0.0  # seconds spent in optimizer steps (what --max-minutes counts), rank 0's clock
    last_loss: float = float("nan")
    stopped_by_time: bool = False
    t0: float = 0.0  # perf_counter() when this process's steps began
    cpu0: float = 0.0  # process_time() then: this process's CPU time (what a budget bought on a shared machine)

    @property
    def base_model(self) -> torch.nn.Module:
        return unwrap(self.wrapped)

    @property
    def budget_s(self) -> float:
        return self.config.max_minutes * 60.0

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_NAME

    def elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return bool(self.budget_s) and self.train_seconds >= self.budget_s


def _run(
    model, train_ids, out_dir, config, info, state, fingerprints, *, teacher, val_ids, tokenizer_from, progress, summary,
    on_step_end, desc,
):  # fmt: skip
    """The training loop proper (see :func:`train`); OUT is checked and locked by the caller."""
    from gqa.progress import progress as progress_bar

    run = _start(model, train_ids, out_dir, config, info, state, fingerprints, teacher, val_ids)
    total = None if run.budget_s else config.steps - run.done
    bar = progress_bar(total=total, desc=desc, unit="step", enabled=progress and info.is_main)
    try:
        _steps(run, bar, on_step_end)
    finally:
        bar.close()
    validation, best_step, model_sd = _final_weights(run)
    elapsed = run.elapsed()
    if info.is_main:
        _write_outputs(run, validation, best_step, model_sd, elapsed, tokenizer_from, summary)
    if info.distributed:
        dist.barrier()
    return TrainResult(
        out_dir=out_dir,
        steps=run.done,
        tokens=run.done * config.tokens_per_step,
        final_loss=run.last_loss,
        elapsed_s=elapsed,
        validation=validation,
        history=run.history,
        stopped_by_time=run.stopped_by_time,
        best_step=best_step,
    )


def _start(model, train_ids, out_dir, config, info, state, fingerprints, teacher, val_ids) -> _Run:
    """Set-up and resume: the models on the device, DDP / FSDP2 wrapping, the optimizer, a checkpoint's
    weights, step, clocks and best evaluation, and the metrics log cut back to the checkpoint's step."""
    model.to(info.device)
    if teacher is not None:
        teacher.to(info.device).eval()  # run under no_grad below; its parameters are left as they are
    wrapped = _wrap(model, info, config.fsdp)
    optimizer = _optimizer(wrapped, config)
    run = _Run(model, wrapped, optimizer, config, info, train_ids, out_dir, fingerprints, teacher, val_ids)
    if state is not None:
        load_full_state(wrapped, optimizer, state["model"], state["optimizer"])
        run.done = int(state["step"])
        run.best = state.get("best")
        run.prior_elapsed = float(state.get("elapsed_s", 0.0))
        run.train_seconds = float(state.get("train_seconds", run.prior_elapsed))
    if info.is_main:
        # A killed run may have logged steps after its last checkpoint (and a torn last line): drop them,
        # they will be redone. A run restarted without a checkpoint starts a fresh log.
        run.history = [r for r in read_metrics(run.metrics_path) if r.get("step", 0) <= run.done]
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in run.history))
    return run


def _steps(run: _Run, bar, on_step_end: Callable[[int, dict], None] | None) -> None:
    """Optimizer steps from ``run.done`` to ``config.steps``, or until the time budget (--max-minutes) is spent;
    after each: periodic evaluation, the metrics log, periodic checkpoints, progress, ``on_step_end``."""
    run.t0, run.cpu0 = time.perf_counter(), time.process_time()
    run.wrapped.train()
    for step in range(run.done, run.config.steps):
        if run.out_of_time():
            run.stopped_by_time = True
            break
        record = _optimizer_step(run, step)
        out_of_time = run.out_of_time()
        last = run.done == run.config.steps or out_of_time
        _evaluate_periodically(run, record, last)
        _log(run, record, last)
        _checkpoint_periodically(run, record, last)
        _show_progress(run, bar, record)
        if on_step_end is not None:
            on_step_end(run.done, record)
        if out_of_time:
            run.stopped_by_time = True
            break


def _optimizer_step(run: _Run, step: int) -> dict:
    """Optimizer step ``step``: its learning rate, its micro-batches' gradients, clipping and the update; then
    the step's one host sync of its numbers. Advances ``run.done`` and the budget clock; returns the record."""
    config, info = run.config, run.info
    t_step = time.perf_counter()
    lr = config.lr_at(step, run.train_seconds / run.budget_s if run.budget_s else 0.0)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = _accumulate_gradients(run, step)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in run.wrapped.parameters() if p.requires_grad],
        config.grad_clip if config.grad_clip > 0 else float("inf"),
    )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    values = _step_values(sums, grad_norm, info)
    step_seconds = time.perf_counter() - t_step
    # Under torchrun every process must stop at the same step: use rank 0's clock.
    run.train_seconds += float(_broadcast_float(step_seconds, info))
    run.done = step + 1
    return _record(run, lr, values, step_seconds)


def _accumulate_gradients(run: _Run, step: int) -> torch.Tensor:
    """Forward and backward over step ``step``'s ``grad_accum`` micro-batches (this process's rows of each);
    returns float64 [2] on the device, with no host sync: the LM cross-entropy sum and the KL sum (0 without
    a teacher) over this process's tokens."""
    config, info, wrapped = run.config, run.info, run.wrapped
    offsets = batch_offsets(run.train_ids.numel(), config, step)
    local_rows = config.micro_batch // info.world_size
    scale = info.world_size / config.tokens_per_step  # DDP/FSDP average gradients over processes
    sums = torch.zeros(2, dtype=torch.float64, device=info.device)
    for micro in range(config.grad_accum):
        rows = offsets[micro * config.micro_batch : (micro + 1) * config.micro_batch]
        rows = rows[info.rank * local_rows : (info.rank + 1) * local_rows]
        inputs, targets = _window_batch(run.train_ids, rows, config.seq_len)
        inputs, targets = inputs.to(info.device), targets.to(info.device)
        sync = contextlib.nullcontext()
        if hasattr(wrapped, "no_sync") and micro < config.grad_accum - 1:
            sync = wrapped.no_sync()  # DDP: all-reduce once per optimizer step
        with sync:
            loss_sum, parts = _micro_loss(run, inputs, targets)
            (loss_sum * scale).backward()
        sums += parts
    return sums


def _micro_loss(run: _Run, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch (inputs, targets [b, L]): the loss sum to back-propagate, and its parts detached as
    float64 [2]: the LM cross-entropy sum and T^2 x KL(teacher_T || model_T) summed over the b x L tokens."""
    config, device = run.config, run.info.device
    with _autocast(config, device):
        logits = run.wrapped(inputs)  # (b, L, V)
    logits = logits.float()
    lm_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    if run.teacher is None:
        return lm_sum, torch.stack([lm_sum.detach(), lm_sum.new_zeros(())]).double()
    alpha, temp = config.distill_alpha, config.distill_temperature
    with torch.no_grad(), _autocast(config, device):
        t_logits = model_logits(run.teacher, inputs)
    t_logp = F.log_softmax(t_logits.float() / temp, dim=-1)
    s_logp = F.log_softmax(logits / temp, dim=-1)
    kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum() * temp**2
    return (1 - alpha) * lm_sum + alpha * kl_sum, torch.stack([lm_sum.detach(), kl_sum.detach()]).double()


def _step_values(sums: torch.Tensor, grad_norm: torch.Tensor, info: DistInfo) -> list[float]:
    """The step's one host sync: [LM sum, KL sum] (float64 [2]) summed over processes in one all-reduce,
    and the gradient norm (a DTensor under FSDP2), read together as [lm_sum, kl_sum, grad_norm]."""
    if info.distributed:
        dist.all_reduce(sums)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return torch.cat([sums, norm.detach().reshape(1).to(sums)]).tolist()


def _record(run: _Run, lr: float, values: list[float], step_seconds: float) -> dict:
    """The metrics record of the step just taken (``run.done``); sets ``run.last_loss``."""
    config = run.config
    lm_total, kl_total, grad_norm = values
    lm_loss = lm_total / config.tokens_per_step
    kl = kl_total / config.tokens_per_step if run.teacher is not None else None
    alpha = config.distill_alpha
    run.last_loss = (1 - alpha) * lm_loss + alpha * kl if kl is not None else lm_loss
    return {
        "step": run.done,
        "tokens": run.done * config.tokens_per_step,
        "loss": run.last_loss,
        "lm_loss": lm_loss,
        "kl": kl,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": config.tokens_per_step / step_seconds,
        "train_seconds": run.train_seconds,
        "elapsed_s": run.elapsed(),
        "cpu_seconds": time.process_time() - run.cpu0,  # this session's CPU time (all threads)
    }


def _evaluate_periodically(run: _Run, record: dict, last: bool) -> None:
    """Every ``eval_every`` steps but the last (the final validation follows it): the validation perplexity
    into ``record``; with keep_best, a CPU copy of the weights when they are the best so far."""
    config = run.config
    if not (config.eval_every and run.val_ids is not None and run.done % config.eval_every == 0 and not last):
        return
    res = evaluate_lm(run.base_model, run.val_ids, seq_len=config.seq_len, max_tokens=config.eval_tokens)
    record["val_perplexity"] = res.perplexity
    if config.keep_best and (run.best is None or res.perplexity < run.best["perplexity"]):
        model_sd = full_state(run.wrapped, run.optimizer)[0] if run.info.distributed else None
        sd = model_sd if model_sd is not None else run.base_model.state_dict()
        run.best = {
            "step": run.done,
            "perplexity": res.perplexity,
            "model": {k: v.detach().cpu().clone() for k, v in sd.items()},
        }


def _log(run: _Run, record: dict, last: bool) -> None:
    """Append ``record`` to metrics.jsonl (rank 0) every ``log_every`` steps, at the last and at evaluations."""
    if run.info.is_main and (run.done % run.config.log_every == 0 or last or "val_perplexity" in record):
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        run.history.append(record)


def _checkpoint_periodically(run: _Run, record: dict, last: bool) -> None:
    """Every ``checkpoint_every`` steps but the last: model, optimizer, step, clocks, best evaluation and
    input fingerprints in checkpoint.pt (gathered on every rank, written by rank 0)."""
    config = run.config
    if not (config.checkpoint_every and run.done % config.checkpoint_every == 0 and not last):
        return
    model_sd, optim_sd = full_state(run.wrapped, run.optimizer)
    if run.info.is_main:
        save_checkpoint(
            run.out_dir / CHECKPOINT_NAME,
            {
                "step": run.done,
                "model": model_sd,
                "optimizer": optim_sd,
                "model_config": run.model.config.to_dict(),
                "train_config": config.to_dict(),
                "inputs": run.fingerprints,
                "elapsed_s": record["elapsed_s"],
                "train_seconds": run.train_seconds,
                "best": run.best,
            },
        )


def _show_progress(run: _Run, bar, record: dict) -> None:
    """One step on the progress bar: loss, learning rate, tokens/s and, with a budget, minutes used."""
    postfix = {"loss": f"{run.last_loss:.3f}", "lr": f"{record['lr']:.1e}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
    if run.budget_s:
        postfix["min"] = f"{run.train_seconds / 60:.1f}/{run.config.max_minutes:g}"
    bar.set_postfix(**postfix)
    bar.update(1)


def _final_weights(run: _Run) -> tuple[EvalResult | None, int | None, dict | None]:
    """The final validation and the weights to keep: with keep_best, an earlier evaluation's weights when the
    last ones evaluate worse. Returns (validation, the kept step or None for the last, the unsharded state
    to save under FSDP2 or None)."""
    config, info, base = run.config, run.info, run.base_model
    sharded = config.fsdp and info.distributed
    validation = None
    if run.val_ids is not None:
        validation = evaluate_lm(base, run.val_ids, seq_len=config.seq_len, max_tokens=config.eval_tokens)
    best, best_step = run.best, None
    if best is not None and validation is not None and best["perplexity"] < validation.perplexity:
        best_step = best["step"]
        if sharded:  # the saved copy is rebuilt from best["model"] below
            validation = EvalResult(**{**validation.to_dict(), "perplexity": best["perplexity"]})
        else:
            base.load_state_dict(best["model"])
            validation = evaluate_lm(base, run.val_ids, seq_len=config.seq_len, max_tokens=config.eval_tokens)
    model_sd = full_state(run.wrapped, run.optimizer)[0] if sharded else None
    if best_step is not None and model_sd is not None:
        model_sd = best["model"]
    return validation, best_step, model_sd


def _write_outputs(run: _Run, validation, best_step, model_sd, elapsed, tokenizer_from, summary) -> None:
    """Rank 0 at the end: the model as a transformers folder, training.json; the checkpoint removed (a latent
    model's final checkpoint.pt, which replaced the training one atomically, is its output)."""
    model, config = run.model, run.config
    to_save = run.base_model
    if model_sd is not None:  # FSDP: rebuild an unsharded copy on CPU from the gathered state
        to_save = GQAForCausalLM(GQAConfig.from_dict(model.config.to_dict()))
        to_save.load_state_dict(model_sd)
    _save_model_files(to_save, run.out_dir, tokenizer_from)
    write_json_atomic(
        run.out_dir / SUMMARY_NAME,
        {
            **(summary or {}),
            "steps": run.done,
            "tokens": run.done * config.tokens_per_step,
            "final_loss": run.last_loss,
            "validation": validation.to_dict() if validation else None,
            "kept_step": best_step if best_step is not None else run.done,
            "stopped_by_time": run.stopped_by_time,
            "train_seconds": run.train_seconds,
            "distilled": run.teacher is not None,
            "processes": run.info.world_size,
            "elapsed_s": elapsed,
            "train_config": config.to_dict(),
            "model_config": model.config.to_dict(),
            "provenance": provenance(),
        },
    )
    if getattr(to_save.config, "latent_rank", None) is None:  # a latent model's checkpoint.pt is the model itself
        (run.out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    _clean_partials(run.out_dir)


def _broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every process (so time-based decisions agree); ``value`` when not distributed."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t.item())
