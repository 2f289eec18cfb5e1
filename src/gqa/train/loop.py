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
from gqa.model import GQAConfig, GQAForCausalLM, save_hf
from gqa.model.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gqa.formats.transformers import SIDE_FILES
from gqa.provenance import provenance
from gqa.train.config import TrainConfig
from gqa.train.distributed import DistInfo, all_reduce_sum, full_state, init_distributed, load_full_state, unwrap
from gqa.train.distributed import wrap_model as _wrap
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

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "training.json"
#: Present in OUT from the start of a run until it finishes; a live run holds an exclusive lock on it.
RUN_MARKER = ".gqa-training"


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


def _lock_holder(marker: Path) -> str | None:
    """The pid text of a live run holding ``marker``'s lock, or None when no live run holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): nothing to check
        return None
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return (marker.read_text().strip() or "?") if marker.exists() else "?"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire_lock(out_dir: Path):
    """Create RUN_MARKER in ``out_dir`` and hold an exclusive lock on it for the run; returns the fd."""
    marker = out_dir / RUN_MARKER
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise GQAUserError(
                f"another gqa run is training into {out_dir} right now; wait for it to finish or choose another OUT"
            ) from None
    except ImportError:
        pass
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return fd


def _release_lock(fd, out_dir: Path, finished: bool) -> None:
    if fd is None:
        return
    if finished:
        (out_dir / RUN_MARKER).unlink(missing_ok=True)
    os.close(fd)  # closing releases the lock


def check_not_inside(out_dir: str | Path, sources: dict[str, str | Path | None]) -> None:
    """Refuse an OUT that is, contains or lies inside any of ``sources`` ({"MODEL": path, ...})."""
    o = Path(out_dir).expanduser().resolve()
    for name, src in sources.items():
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        base = s.parent if s.is_file() and s.suffix == ".pt" else s  # a checkpoint.pt stands for its run folder
        if o == s or o == base or o.is_relative_to(base) or base.is_relative_to(o):
            raise GQAUserError(
                f"OUT {out_dir} overlaps {name} {src}; choose an output folder outside it (sources are never written)"
            )


def _unfinished(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT_NAME).is_file() or (out_dir / RUN_MARKER).is_file()


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite anything: OUT must be new, or hold an unfinished run when resuming.

    An unfinished run is one with a checkpoint, or one killed before its first checkpoint (OUT holds the
    run marker but no checkpoint): ``--resume`` restarts the latter from step 0. A run that is still alive
    (it holds the marker's lock) is refused either way.
    """
    out_dir = Path(out_dir)
    holder = _lock_holder(out_dir / RUN_MARKER) if out_dir.is_dir() else None
    if holder is not None:
        raise GQAUserError(
            f"another gqa run ({holder}) is training into {out_dir} right now; wait for it or choose another OUT"
        )
    if resume:
        if _unfinished(out_dir):
            return
        if out_dir.exists():
            raise GQAUserError(
                f"{out_dir} holds no unfinished run to resume (finished or not a training folder); "
                "choose another OUT and drop --resume"
            )
        raise GQAUserError(f"{out_dir} does not exist, so there is nothing to resume; drop --resume to start a run")
    if out_dir.exists():
        if _unfinished(out_dir):
            raise GQAUserError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another OUT")
        raise GQAUserError(f"{out_dir} exists; choose another output path (nothing was written)")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn line (a run killed mid-write) is skipped, not an error."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _clean_partials(out_dir: Path) -> None:
    """Remove temporary files that a killed run left in OUT (half-written checkpoints, staged folders)."""
    for pattern in (f".{CHECKPOINT_NAME}.*", ".model.*", f".{SUMMARY_NAME}.tmp*", f".{METRICS_NAME}.tmp*"):
        for p in out_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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
            keep = ".attn.k_proj." in f".{name}" or ".attn.v_proj." in f".{name}"
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
    """Write the transformers folder files (config, weights, tokenizer) into ``out_dir``, each atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out_dir))
    try:
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
            _clean_partials(out_dir)
            if tokenizer_from is not None:  # so checkpoints in OUT can be evaluated before the run ends
                for name in SIDE_FILES:
                    if (Path(tokenizer_from) / name).is_file():
                        shutil.copy2(Path(tokenizer_from) / name, out_dir / name)
        fingerprints = _run_fingerprints(train_ids, val_ids, teacher)
        # A run killed before its first checkpoint has none: --resume then restarts it from step 0.
        state = load_checkpoint(out_dir / CHECKPOINT_NAME) if resume and (out_dir / CHECKPOINT_NAME).is_file() else None
        if state is not None:
            if state["model_config"] != model.config.to_dict():
                raise GQAUserError(
                    f"{out_dir / CHECKPOINT_NAME} was written for another model config; resume with that model"
                )
            saved = TrainConfig.from_dict(state["train_config"])
            if saved != config:
                diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
                raise GQAUserError(
                    f"training settings differ from the checkpoint's ({', '.join(diff)}); resume with the same ones"
                )
            _check_same_inputs(state.get("inputs"), fingerprints, out_dir)
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


def _run(
    model, train_ids, out_dir, config, info, state, fingerprints, *, teacher, val_ids, tokenizer_from, progress, summary,
    on_step_end, desc,
):  # fmt: skip
    """The training loop proper (see :func:`train`); OUT is checked and locked by the caller."""
    from gqa.progress import progress as progress_bar

    model.to(info.device)
    if teacher is not None:
        teacher.to(info.device).eval()  # run under no_grad below; its parameters are left as they are
    wrapped = _wrap(model, info, config.fsdp)
    optimizer = _optimizer(wrapped, config)
    start = 0
    best = None  # {"step", "perplexity", "model"}: the best periodic evaluation so far (keep_best)
    if state is not None:
        load_full_state(wrapped, optimizer, state["model"], state["optimizer"])
        start = int(state["step"])
        best = state.get("best")
    base_model = unwrap(wrapped)

    metrics_path = out_dir / METRICS_NAME
    history: list[dict] = []
    if info.is_main:
        # A killed run may have logged steps after its last checkpoint (and a torn last line): drop them,
        # they will be redone. A run restarted without a checkpoint starts a fresh log.
        history = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    prior_elapsed = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0
    train_seconds = float(state.get("train_seconds", prior_elapsed)) if state is not None else 0.0
    budget_s = config.max_minutes * 60.0

    world, L = info.world_size, config.seq_len
    local_rows = config.micro_batch // world
    scale = world / config.tokens_per_step  # DDP/FSDP average gradients over processes
    alpha, temp = (config.distill_alpha, config.distill_temperature) if teacher is not None else (0.0, 1.0)
    bar = progress_bar(
        total=None if budget_s else config.steps - start,
        desc=desc,
        unit="step",
        enabled=progress and info.is_main,
    )
    t0 = time.perf_counter()
    cpu0 = time.process_time()  # this process's CPU time: what a time budget bought on a shared machine
    last_loss = float("nan")
    done = start
    stopped_by_time = False
    wrapped.train()
    try:
        for step in range(start, config.steps):
            if budget_s and train_seconds >= budget_s:
                stopped_by_time = True
                break
            t_step = time.perf_counter()
            lr = config.lr_at(step, train_seconds / budget_s if budget_s else 0.0)
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
                [p for p in wrapped.parameters() if p.requires_grad],
                config.grad_clip if config.grad_clip > 0 else float("inf"),
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lm_total, kl_total = all_reduce_sum(sums, info)
            step_seconds = time.perf_counter() - t_step
            # Under torchrun every process must stop at the same step: use rank 0's clock.
            train_seconds += float(_broadcast_float(step_seconds, info))
            lm_loss = lm_total / config.tokens_per_step
            kl = kl_total / config.tokens_per_step if teacher is not None else None
            last_loss = (1 - alpha) * lm_loss + alpha * kl if kl is not None else lm_loss
            done = step + 1
            record = {
                "step": done,
                "tokens": done * config.tokens_per_step,
                "loss": last_loss,
                "lm_loss": lm_loss,
                "kl": kl,
                "lr": lr,
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens_per_s": config.tokens_per_step / step_seconds,
                "train_seconds": train_seconds,
                "elapsed_s": prior_elapsed + time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - cpu0,  # this session's CPU time (all threads)
            }
            out_of_time = bool(budget_s) and train_seconds >= budget_s
            last = done == config.steps or out_of_time
            if config.eval_every and val_ids is not None and done % config.eval_every == 0 and not last:
                res = evaluate_lm(base_model, val_ids, seq_len=L, max_tokens=config.eval_tokens)
                record["val_perplexity"] = res.perplexity
                if config.keep_best and (best is None or res.perplexity < best["perplexity"]):
                    model_sd = full_state(wrapped, optimizer)[0] if info.distributed else None
                    sd = model_sd if model_sd is not None else base_model.state_dict()
                    best = {
                        "step": done,
                        "perplexity": res.perplexity,
                        "model": {k: v.detach().cpu().clone() for k, v in sd.items()},
                    }
            if info.is_main and (done % config.log_every == 0 or last or "val_perplexity" in record):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                history.append(record)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and not last:
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
                            "inputs": fingerprints,
                            "elapsed_s": record["elapsed_s"],
                            "train_seconds": train_seconds,
                            "best": best,
                        },
                    )
            postfix = {"loss": f"{last_loss:.3f}", "lr": f"{lr:.1e}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
            if budget_s:
                postfix["min"] = f"{train_seconds / 60:.1f}/{config.max_minutes:g}"
            bar.set_postfix(**postfix)
            bar.update(1)
            if on_step_end is not None:
                on_step_end(done, record)
            if out_of_time:
                stopped_by_time = True
                break
    finally:
        bar.close()

    validation = None
    if val_ids is not None:
        validation = evaluate_lm(base_model, val_ids, seq_len=L, max_tokens=config.eval_tokens)
    best_step = None
    if best is not None and validation is not None and best["perplexity"] < validation.perplexity:
        # keep_best: the last weights evaluated worse than an earlier evaluation: the output holds those.
        best_step = best["step"]
        if config.fsdp and info.distributed:  # sharded: the saved copy is rebuilt from best["model"] below
            validation = EvalResult(**{**validation.to_dict(), "perplexity": best["perplexity"]})
        else:
            base_model.load_state_dict(best["model"])
            validation = evaluate_lm(base_model, val_ids, seq_len=L, max_tokens=config.eval_tokens)
    model_sd, _ = full_state(wrapped, optimizer) if config.fsdp and info.distributed else (None, None)
    if best_step is not None and model_sd is not None:
        model_sd = best["model"]
    elapsed = prior_elapsed + time.perf_counter() - t0
    if info.is_main:
        to_save = base_model
        if model_sd is not None:  # FSDP: rebuild an unsharded copy on CPU from the gathered state
            to_save = GQAForCausalLM(GQAConfig.from_dict(model.config.to_dict()))
            to_save.load_state_dict(model_sd)
        _save_model_files(to_save, out_dir, tokenizer_from)
        write_json_atomic(
            out_dir / SUMMARY_NAME,
            {
                **(summary or {}),
                "steps": done,
                "tokens": done * config.tokens_per_step,
                "final_loss": last_loss,
                "validation": validation.to_dict() if validation else None,
                "kept_step": best_step if best_step is not None else done,
                "stopped_by_time": stopped_by_time,
                "train_seconds": train_seconds,
                "distilled": teacher is not None,
                "processes": info.world_size,
                "elapsed_s": elapsed,
                "train_config": config.to_dict(),
                "model_config": model.config.to_dict(),
                "provenance": provenance(),
            },
        )
        (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        _clean_partials(out_dir)
    if info.distributed:
        dist.barrier()
    return TrainResult(
        out_dir=out_dir,
        steps=done,
        tokens=done * config.tokens_per_step,
        final_loss=last_loss,
        elapsed_s=elapsed,
        validation=validation,
        history=history,
        stopped_by_time=stopped_by_time,
        best_step=best_step,
    )


def _broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every process (so time-based decisions agree); ``value`` when not distributed."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t.item())
