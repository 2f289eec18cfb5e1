"""``gqa uptrain``: continued training of a converted model, optionally distilled from the original.

The project's recipe: ``gqa uptrain CONVERTED OUT --teacher SRC --max-minutes 10 --data english:train``
distils end to end from the original model for a time budget, evaluating on a held-out slice and keeping
the best weights. With ``--teacher`` the defaults are the measured best distillation (``--train attention
--alpha 1 --lr 1e-3 --batch-size 4``, :data:`gqa.train.uptrain.DISTILL_DEFAULTS`); without it the GQA
paper's uptraining (``--train all --lr 5e-4 --batch-size 16``). Explicit flags override either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import console, user_errors
from gqa.errors import GQAUserError


def load_trainable(path: Path):
    """A gqa model to train from a transformers folder, a gqa checkpoint or a GGUF file."""
    from gqa.model import GQAForCausalLM
    from gqa.model.loading import load_model

    model = load_model(path)
    if not isinstance(model, GQAForCausalLM):
        from gqa.families import names

        raise GQAUserError(
            f"{path} is a {type(model).__name__}; gqa trains {'/'.join(names(runs=True))} models, convert it first"
        )
    return model


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def uptrain(
        model: Annotated[Path, typer.Argument(help="Converted model: transformers folder, checkpoint.pt or .gguf.")],
        out: Annotated[Path, typer.Argument(help="Output folder (must not exist, unless --resume).")],
        data: str = typer.Option(
            "shakespeare:train", help="Training text: shakespeare[:split], a file, folder or .jsonl."
        ),
        tokens: int = typer.Option(None, help="Uptraining budget in tokens."),
        max_minutes: float = typer.Option(
            None, help="Time budget in minutes of training (alone or with --tokens: whichever ends first)."
        ),
        train: str = typer.Option(
            None,
            "--train",
            help="Parameters that move: all, attention or kv. Default: attention with --teacher, else all.",
            show_default=False,
        ),
        fraction: float = typer.Option(None, help="Budget as a fraction in (0, 1] of the pre-training tokens."),
        pretrain_tokens: int = typer.Option(
            None, help="Pre-training tokens for --fraction (default: read from MODEL/training.json)."
        ),
        teacher: Annotated[Path | None, typer.Option(help="Original model to distil from (same vocabulary).")] = None,
        alpha: float = typer.Option(
            None,
            help="Weight of the distillation KL (1 - alpha on the LM loss); 1 = pure end-to-end distillation. "
            "Needs --teacher. Default: 1.",
            show_default=False,
        ),
        temperature: float = typer.Option(1.0, help="Distillation temperature."),
        val_data: str = typer.Option(
            None,
            help="Validation text ('' for none; 'holdout' for the last --holdout share of --data, never trained "
            "on). Default: the held-out split of a built-in --data (shakespeare:validation, english:eval), "
            "none for your own text.",
            show_default=False,
        ),
        holdout: float = typer.Option(0.05, help="Share of --data held out when --val-data holdout."),
        tokenizer: Annotated[
            Path | None, typer.Option(help="Tokenizer folder or .gguf (default: MODEL's own).")
        ] = None,
        seq_len: int = typer.Option(256, help="Tokens per training window."),
        batch_size: int = typer.Option(
            None,
            help="Windows per optimizer step, over all processes. Default: 4 with --teacher, else 16.",
            show_default=False,
        ),
        grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
        lr: float = typer.Option(
            None,
            help="Peak learning rate (warm-up, then cosine to 10%). Default: 1e-3 with --teacher, else 5e-4.",
            show_default=False,
        ),
        warmup: int = typer.Option(None, help="Warm-up steps (default: 10% of the steps)."),
        seed: int = typer.Option(0, help="Random seed (data order)."),
        eval_every: int = typer.Option(
            0, help="Steps between validation evaluations (0: at the end only); the best weights are kept."
        ),
        checkpoint_every: int = typer.Option(25, help="Steps between checkpoints."),
        resume: bool = typer.Option(False, help="Continue the unfinished run in OUT from its checkpoint."),
        fsdp: bool = typer.Option(False, help="Under torchrun: shard with FSDP2 instead of DDP."),
        device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    ) -> None:
        """Uptrain a converted model for --tokens N, --fraction A of its pre-training, or --max-minutes M."""
        from gqa.data import encode, load_text
        from gqa.data.text import held_out_spec
        from gqa.model.loading import check_context, load_model, load_model_tokenizer
        from gqa.progress import load_announced
        from gqa.train.config import TRAIN_PARAMS
        from gqa.train.loop import check_not_inside, check_out_dir
        from gqa.train.uptrain import read_pretrain_tokens, uptrain_defaults, uptrain_tokens
        from gqa.train.uptrain import uptrain as run

        if pretrain_tokens is None and fraction is not None and model.is_dir():
            pretrain_tokens = read_pretrain_tokens(model)
        if max_minutes is not None and not (0 < max_minutes < float("inf")):
            raise GQAUserError(f"--max-minutes must be a positive number of minutes, got {max_minutes}")
        if tokens is not None or fraction is not None or max_minutes is None:
            uptrain_tokens(tokens, fraction, pretrain_tokens)  # validate the budget before loading anything
        if train is not None and train not in TRAIN_PARAMS:
            raise GQAUserError(f"--train must be one of {', '.join(TRAIN_PARAMS)}, got {train!r}")
        if alpha is not None and teacher is None:
            raise GQAUserError(f"--alpha {alpha:g} weighs distillation from a teacher; pass --teacher SRC or drop --alpha")
        if not 0 < holdout < 1:
            raise GQAUserError(f"--holdout must be in (0, 1), got {holdout}; e.g. 0.05")
        check_not_inside(out, {"MODEL": model, "--teacher": teacher, "--tokenizer": tokenizer})
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone owns OUT
            check_out_dir(out, resume)
        if val_data is None:
            val_data = held_out_spec(data) or ""
            if not val_data:
                console.print(f"note: no validation text (pass --val-data holdout to hold out the tail of {data})", soft_wrap=True)
        tok = load_model_tokenizer(model, tokenizer)
        train_ids = encode(tok, load_text(data))
        if val_data == "holdout":  # the tail of --data, never trained on
            n_val = max(2, int(len(train_ids) * holdout))
            train_ids, val_ids = train_ids[:-n_val], train_ids[-n_val:]
        else:
            val_ids = encode(tok, load_text(val_data, default_split="validation")) if val_data else None
        student = load_announced(model, load_trainable)
        teacher_model = load_announced(teacher, load_model, "teacher")
        check_context(seq_len, {"MODEL": student, "--teacher": teacher_model})
        given = dict(train_params=train, distill_alpha=alpha, lr=lr, batch_size=batch_size)
        settings = {**uptrain_defaults(teacher is not None), **{k: v for k, v in given.items() if v is not None}}
        settings.update(seq_len=seq_len, grad_accum=grad_accum, seed=seed, distill_temperature=temperature)
        settings.update(eval_every=eval_every, checkpoint_every=checkpoint_every, fsdp=fsdp)
        if warmup is not None:
            settings["warmup_steps"] = warmup
        with tempfile.TemporaryDirectory() as tok_dir:
            tok.save_pretrained(tok_dir)
            res = run(
                student,
                train_ids,
                out,
                tokens=tokens,
                fraction=fraction,
                pretrain_tokens=pretrain_tokens,
                max_minutes=max_minutes,
                teacher=teacher_model,
                val_ids=val_ids,
                resume=resume,
                tokenizer_from=tok_dir,
                device=device,
                summary={"model": str(model), "data": data, "teacher": str(teacher) if teacher else None},
                **settings,
            )
        msg = f"saved {out} ({res.tokens:,} tokens in {res.steps} steps, final loss {res.final_loss:.3f}"
        if res.stopped_by_time:
            msg += f", stopped at the {max_minutes:g}-minute budget"
        if res.best_step is not None:
            msg += f", kept the best evaluation's weights (step {res.best_step})"
        if res.validation is not None:
            msg += f", validation perplexity {res.validation.perplexity:.2f}"
        if int(os.environ.get("RANK", "0")) == 0:
            console.print(msg + ")")
