"""``gqa eval``: perplexity, tokens evaluated and KL to a teacher for a model on some text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import DTYPE_HELP, console, model_loader, user_errors
from gqa.errors import GQAUserError


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @user_errors
    def eval_(
        model: Annotated[Path, typer.Argument(help="Transformers folder, gqa checkpoint.pt or .gguf file.")],
        data: str = typer.Option("shakespeare:validation", help="Text: shakespeare[:split], a file, folder or .jsonl."),
        teacher: Annotated[
            Path | None, typer.Option(help="Reference model for KL(teacher || model) (same vocabulary).")
        ] = None,
        tokenizer: Annotated[
            Path | None, typer.Option(help="Tokenizer folder or .gguf (default: MODEL's own).")
        ] = None,
        seq_len: int = typer.Option(
            None, help="Tokens of context per window (default: 256, or the model's context if shorter)."
        ),
        batch_size: int = typer.Option(8, help="Windows per forward pass."),
        max_tokens: int = typer.Option(None, help="Score at most this many tokens."),
        prompts: str = typer.Option(
            None,
            help="With --teacher: greedy-continuation agreement on a prompt set (prompts:knowledge, .txt, .jsonl).",
        ),
        prompt_tokens: int = typer.Option(16, help="Greedy tokens per prompt for --prompts."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        dtype: str = typer.Option(None, help=DTYPE_HELP),
    ) -> None:
        """Evaluate a model: perplexity, tokens evaluated, and KL to --teacher."""
        from gqa.data import encode, load_text
        from gqa.data.tokenizer import leading_bos
        from gqa.evaluate import evaluate_lm
        from gqa.evaluate.prompts import greedy_agreement, load_prompts
        from gqa.model.loading import check_context, load_model_tokenizer
        from gqa.progress import load_announced

        if prompts is not None and teacher is None:
            raise GQAUserError("--prompts compares greedy continuations with the original's; pass --teacher too")
        prompt_set = load_prompts(prompts) if prompts is not None else None
        load_model = model_loader(dtype)
        # Models first: their configs are validated (one line each) before text is read or tokenized.
        student = load_announced(model, load_model)
        teacher_model = load_announced(teacher, load_model, "teacher")
        if seq_len is not None:
            check_context(seq_len, {"MODEL": student, "--teacher": teacher_model})
        tok = load_model_tokenizer(model, tokenizer)
        ids = encode(tok, load_text(data, default_split="validation"))
        bos = leading_bos(tok)  # each window starts with it when the tokenizer puts it before a text
        res = evaluate_lm(
            student,
            ids,
            teacher=teacher_model,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            progress=not as_json,
            bos_token_id=bos,
        )
        out = {"model": str(model), "data": data, "dtype": dtype or "float32", **res.to_dict(), "bos_token_id": bos}
        if teacher is not None:
            out["teacher"] = str(teacher)
        agreement = None
        if prompt_set is not None:
            agreement = greedy_agreement(student, teacher_model, tok, prompt_set, prompt_tokens)
            out["prompts"] = {"set": prompts, **agreement.to_dict()}
        if as_json:
            print(json.dumps(out))
            return
        console.print(f"[bold]{model}[/] on {data}")
        console.print(f"  perplexity  {res.perplexity:.3f}  (nll {res.nll:.4f} nats/token)")
        console.print(f"  tokens      {res.tokens:,}" + (f"  (each window after BOS {bos})" if bos is not None else ""))
        if res.kl is not None:
            console.print(f"  KL(teacher || model)  {res.kl:.4f} nats/token")
            console.print(f"  top-1 agreement       {res.top1_agreement:.1%} of positions predict the teacher's token")
        if agreement is not None:
            console.print(
                f"  greedy on {prompts}  {agreement.identical:.0%} of {agreement.prompts} prompts identical for "
                f"{agreement.new_tokens} tokens; {agreement.prefix:.0%} of tokens before the first difference"
            )
