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
from tqdm.auto import tqdm

from gqa.evaluate import EvalResult, evaluate_lm, model_logits
from gqa.model import GQAConfig, GQAForCausalLM, save_hf
from gqa.model.hf import SIDE_FILES
from gqa.provenance import provenance
from gqa.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gqa.train.config import TrainConfig
from gqa.train.distributed import DistInfo, all_reduce_sum, full_state, init_distributed, load_full_state, unwrap
from gqa.train.distributed import wrap_model as _wrap

__all__ = ["TrainResult", "train", "batch_offsets", "check_out_dir", "METRICS_NAME", "SUMMARY_NAME"]

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "training.json"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float
    elapsed_s: float
    validation: EvalResult | None = None
    history: list[dict] = field(default_factory=list)


def batch_offsets(n_tokens: int, config: TrainConfig, step: int) -> torch.Tensor:
    """Start offsets [batch_size] of the windows of optimizer step ``step`` (same on every process)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - config.seq_len, (config.batch_size,), generator=g)


def _window_batch(ids: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([ids[o : o + seq_len + 1] for o in offsets.tolist()])  # (b, L+1)
    return rows[:, :-1], rows[:, 1:]


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite anything: OUT must be new, or hold an unfinished run when resuming."""
    ckpt = out_dir / CHECKPOINT_NAME
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{out_dir} holds no {CHECKPOINT_NAME} to resume from; drop --resume to start a run"
            )
    elif out_dir.exists():
        if ckpt.is_file():
            raise FileExistsError(
                f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another OUT"
            )
        raise FileExistsError(f"{out_dir} exists; choose another output path (nothing was written)")


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
    """Write the transformers folder files (config, weights, tokenizer) into ``out_dir``, each atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out_dir))
    try:
        staged = save_hf(model, tmp / "m", side_files_from=tokenizer_from)
        for f in staged.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    train_ids = torch.as_tensor(train_ids, dtype=torch.long).cpu()
    if train_ids.dim() != 1:
        raise ValueError(f"train_ids must be 1-D [N], got shape {tuple(train_ids.shape)}")
    if train_ids.numel() < config.seq_len + 1:
        raise ValueError(
            f"training data has {train_ids.numel()} tokens, fewer than seq_len + 1 = {config.seq_len + 1}; "
            "give more text or a smaller --seq-len"
        )
    vocab = model.config.vocab_size
    if int(train_ids.max()) >= vocab:
        raise ValueError(
            f"token id {int(train_ids.max())} is outside the model's vocabulary ({vocab}); use its tokenizer"
        )
    if teacher is not None and _vocab(teacher) not in (None, vocab):
        raise ValueError(
            f"teacher vocabulary ({_vocab(teacher)}) differs from the model's ({vocab}); "
            "distil from the original model the student was converted from"
        )
    if val_ids is not None:
        val_ids = torch.as_tensor(val_ids, dtype=torch.long).cpu()
        if val_ids.numel() < 2:
            raise ValueError("validation data has fewer than 2 tokens; give more validation text")
    info: DistInfo = init_distributed(device)
    if config.micro_batch % info.world_size:
        raise ValueError(
            f"batch_size / grad_accum = {config.micro_batch} sequences per micro-step do not split over "
            f"{info.world_size} processes; make it a multiple of the process count"
        )
    if info.is_main:
        check_out_dir(out_dir, resume)
        out_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer_from is not None:  # so checkpoints in OUT can be evaluated before the run ends
            for name in SIDE_FILES:
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, out_dir / name)
    state = load_checkpoint(out_dir / CHECKPOINT_NAME) if resume else None
    if state is not None:
        if state["model_config"] != model.config.to_dict():
            raise ValueError(
                f"{out_dir / CHECKPOINT_NAME} was written for another model config; resume with that model"
            )
        saved = TrainConfig.from_dict(state["train_config"])
        if saved != config:
            diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
            raise ValueError(
                f"training settings differ from the checkpoint's ({', '.join(diff)}); resume with the same ones"
            )

    model.to(info.device)
    if teacher is not None:
        teacher.to(info.device).eval()  # run under no_grad below; its parameters are left as they are
    wrapped = _wrap(model, info, config.fsdp)
    optimizer = _optimizer(wrapped, config)
    start = 0
    if state is not None:
        load_full_state(wrapped, optimizer, state["model"], state["optimizer"])
        start = int(state["step"])
    base_model = unwrap(wrapped)

    metrics_path = out_dir / METRICS_NAME
    history: list[dict] = []
    if info.is_main and metrics_path.exists():
        # A killed run may have logged steps after its last checkpoint: drop them, they will be redone.
        kept = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        history = [r for r in kept if r.get("step", 0) <= start]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    prior_elapsed = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0

    world, L = info.world_size, config.seq_len
    local_rows = config.micro_batch // world
    scale = world / config.tokens_per_step  # DDP/FSDP average gradients over processes
    alpha, temp = (config.distill_alpha, config.distill_temperature) if teacher is not None else (0.0, 1.0)
    bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step", disable=not (progress and info.is_main))
    t0 = time.perf_counter()
    last_loss = float("nan")
    wrapped.train()
    try:
        for step in range(start, config.steps):
            t_step = time.perf_counter()
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = batch_offsets(train_ids.numel(), config, step)
            sums = [0.0, 0.0]  # LM loss sum, KL sum (over this process's tokens)
            for micro in range(config.grad_accum):
                rows = offsets[micro * config.micro_batch : (micro + 1) * config.micro_batch]
                rows = rows[info.rank * local_rows : (info.rank + 1) * local_rows]
                inputs, targets = _window_batch(train_ids, rows, L)
                inputs, targets = inputs.to(info.device), targets.to(info.device)
                last_micro = micro == config.grad_accum - 1
                sync = contextlib.nullcontext()
                if hasattr(wrapped, "no_sync") and not last_micro:
                    sync = wrapped.no_sync()  # DDP: all-reduce once per optimizer step
                with sync:
                    with _autocast(config, info.device):
                        logits = wrapped(inputs)  # (b, L, V)
                    logits = logits.float()
                    lm_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
                    loss_sum = lm_sum
                    if teacher is not None:
                        with torch.no_grad(), _autocast(config, info.device):
                            t_logits = model_logits(teacher, inputs)
                        t_logp = F.log_softmax(t_logits.float() / temp, dim=-1)
                        s_logp = F.log_softmax(logits / temp, dim=-1)
                        kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum() * temp**2
                        loss_sum = (1 - alpha) * lm_sum + alpha * kl_sum
                        sums[1] += kl_sum.item()
                    (loss_sum * scale).backward()
                    sums[0] += lm_sum.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                wrapped.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lm_total, kl_total = all_reduce_sum(sums, info)
            lm_loss = lm_total / config.tokens_per_step
            kl = kl_total / config.tokens_per_step if teacher is not None else None
            last_loss = (1 - alpha) * lm_loss + alpha * kl if kl is not None else lm_loss
            done = step + 1
            tok_s = config.tokens_per_step / (time.perf_counter() - t_step)
            record = {
                "step": done,
                "tokens": done * config.tokens_per_step,
                "loss": last_loss,
                "lm_loss": lm_loss,
                "kl": kl,
                "lr": lr,
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens_per_s": tok_s,
                "elapsed_s": prior_elapsed + time.perf_counter() - t0,
            }
            if config.eval_every and val_ids is not None and done % config.eval_every == 0 and done < config.steps:
                res = evaluate_lm(base_model, val_ids, seq_len=L, max_tokens=config.eval_tokens)
                record["val_perplexity"] = res.perplexity
            if info.is_main and (done % config.log_every == 0 or done == config.steps or "val_perplexity" in record):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                history.append(record)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                model_sd, optim_sd = full_state(wrapped, optimizer)
                if info.is_main:
                    save_checkpoint(
                        out_dir / CHECKPOINT_NAME,
                        {
                            "step": done,
                            "model": model_sd,
                            "optimizer": optim_sd,
                            "model_config": model.config.to_dict(),
                            "train_config": config.to_dict(),
                            "elapsed_s": record["elapsed_s"],
                        },
                    )
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if on_step_end is not None:
                on_step_end(done, record)
    finally:
        bar.close()

    validation = None
    if val_ids is not None:
        validation = evaluate_lm(base_model, val_ids, seq_len=L, max_tokens=config.eval_tokens)
    model_sd, _ = full_state(wrapped, optimizer) if config.fsdp and info.distributed else (None, None)
    elapsed = prior_elapsed + time.perf_counter() - t0
    if info.is_main:
        to_save = base_model
        if model_sd is not None:  # FSDP: rebuild an unsharded copy on CPU from the gathered state
            to_save = GQAForCausalLM(GQAConfig.from_dict(model.config.to_dict()))
            to_save.load_state_dict(model_sd)
        _save_model_files(to_save, out_dir, tokenizer_from)
        _write_json(
            out_dir / SUMMARY_NAME,
            {
                **(summary or {}),
                "steps": config.steps,
                "tokens": config.steps * config.tokens_per_step,
                "final_loss": last_loss,
                "validation": validation.to_dict() if validation else None,
                "distilled": teacher is not None,
                "processes": info.world_size,
                "elapsed_s": elapsed,
                "train_config": config.to_dict(),
                "model_config": model.config.to_dict(),
                "provenance": provenance(),
            },
        )
        (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    if info.distributed:
        dist.barrier()
    return TrainResult(
        out_dir=out_dir,
        steps=config.steps,
        tokens=config.steps * config.tokens_per_step,
        final_loss=last_loss,
        elapsed_s=elapsed,
        validation=validation,
        history=history,
    )
