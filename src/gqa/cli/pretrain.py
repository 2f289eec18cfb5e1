"""``gqa pretrain``: train a small GQAConfig model (and its byte-level BPE) from scratch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    from gqa.train.pretrain import REFERENCE_CONFIG as M
    from gqa.train.pretrain import REFERENCE_TRAIN as T

    @app.command()
    @user_errors
    def pretrain(
        out: Annotated[Path, typer.Argument(help="Output folder (must not exist, unless --resume).")],
        data: str = typer.Option(
            "shakespeare:train", help="Training text: shakespeare[:split], a file, folder or .jsonl."
        ),
        val_data: str = typer.Option(
            None,
            help="Validation text ('' for none). Default: the held-out split of a built-in --data, none for your own.",
            show_default=False,
        ),
        vocab_size: int = typer.Option(M.vocab_size, help="Byte-level BPE vocabulary size."),
        d_model: int = typer.Option(M.d_model, help="Model width."),
        n_layers: int = typer.Option(M.n_layers, help="Decoder blocks."),
        n_heads: int = typer.Option(M.n_heads, help="Query heads Hq."),
        n_kv_heads: int = typer.Option(M.n_kv_heads, help="KV heads Hkv (Hq = MHA; query head h uses KV head h // g)."),
        ffn_dim: int = typer.Option(M.ffn_dim, help="SwiGLU hidden width."),
        steps: int = typer.Option(T.steps, help="Optimizer steps."),
        seq_len: int = typer.Option(T.seq_len, help="Tokens per training window."),
        batch_size: int = typer.Option(T.batch_size, help="Windows per optimizer step (global)."),
        grad_accum: int = typer.Option(T.grad_accum, help="Micro-steps per optimizer step."),
        lr: float = typer.Option(T.lr, help="Peak learning rate."),
        warmup: int = typer.Option(T.warmup_steps, help="Warm-up steps."),
        seed: int = typer.Option(T.seed, help="Random seed (weights and data order)."),
        resume: bool = typer.Option(False, help="Continue the unfinished run in OUT from its checkpoint."),
        device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    ) -> None:
        """Pretrain a model from scratch; the defaults reproduce the shipped Shakespeare MHA model."""
        from gqa.train.pretrain import pretrain as run

        mcfg = replace(
            M,
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=ffn_dim,
            max_seq_len=max(M.max_seq_len, seq_len),
        )
        tcfg = replace(
            T,
            steps=steps,
            seq_len=seq_len,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup_steps=warmup,
            seed=seed,
        )
        res = run(
            out,
            data=data,
            val_data="auto" if val_data is None else (val_data or None),
            model_config=mcfg,
            train_config=tcfg,
            resume=resume,
            device=device,
        )
        msg = f"saved {out} ({res.tokens:,} tokens, final loss {res.final_loss:.3f}"
        if res.validation is not None:
            msg += f", validation perplexity {res.validation.perplexity:.2f}"
        console.print(msg + ")")
