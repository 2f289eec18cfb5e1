"""``gqa demo``: the shipped MHA model converted to GQA-4, GQA-2 and MQA, uptrained, compared."""

from __future__ import annotations

import typer

from gqa.cli.common import console, user_errors
from gqa.errors import GQAUserError


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def demo(
        fraction: float = typer.Option(0.05, help="Uptraining budget as a fraction of the pre-training tokens."),
        eval_tokens: int = typer.Option(16_384, help="Validation tokens per perplexity."),
        plot: str = typer.Option("gqa_demo.png", help="PNG plot of perplexity vs KV-cache size ('' for none)."),
        work_dir: str = typer.Option(None, help="Keep the converted and uptrained models here (default: temporary)."),
        seed: int = typer.Option(0, help="Random seed (data order)."),
    ) -> None:
        """Convert the shipped MHA model to GQA-4, GQA-2 and MQA, uptrain each, compare (CPU, a few minutes)."""
        from gqa.demo import run_demo

        if not 0 < fraction <= 1:
            raise GQAUserError(f"--fraction must be in (0, 1], got {fraction}; pick e.g. --fraction 0.05")
        run_demo(
            fraction=fraction, eval_tokens=eval_tokens, plot=plot or None, work_dir=work_dir, seed=seed, console=console
        )
