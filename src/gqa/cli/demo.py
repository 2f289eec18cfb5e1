"""``gqa demo``: the shipped MHA model converted to GQA-4, GQA-2 and MQA with the GQA paper's recipe and the
project's, uptrained on the same tokens, compared."""

from __future__ import annotations

import typer

from gqa.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    from gqa.demo import DEMO_DISTILL_STEPS

    @app.command()
    @user_errors
    def demo(
        recipes: str = typer.Option(
            "paper,ours",
            help="Recipes to compare, comma-separated: 'paper' (mean pool + LM uptraining) and/or 'ours' "
            "(aligned + fit + local distillation, then end-to-end distillation).",
        ),
        fraction: float = typer.Option(0.05, help="Uptraining budget as a fraction of the pre-training tokens."),
        eval_tokens: int = typer.Option(16_384, help="Validation tokens per perplexity and KL."),
        distill_steps: int = typer.Option(
            DEMO_DISTILL_STEPS, help="Local-distillation steps per layer for 'ours' (gqa convert's default: 150)."
        ),
        plot: str = typer.Option("gqa_demo.png", help="PNG plot of perplexity and KL vs KV-cache size ('' for none)."),
        work_dir: str = typer.Option(None, help="Keep the converted and uptrained models here (default: temporary)."),
        seed: int = typer.Option(0, help="Random seed (data order, distillation)."),
    ) -> None:
        """Convert the shipped MHA model to GQA-4, GQA-2 and MQA with the paper's recipe and gqa's, uptrain
        each on the same tokens, compare perplexity, KL to the original and decode speed (CPU, minutes)."""
        from gqa.demo import parse_recipes, run_demo

        run_demo(
            recipes=parse_recipes(recipes),
            fraction=fraction,
            eval_tokens=eval_tokens,
            distill_steps=distill_steps,
            plot=plot or None,
            work_dir=work_dir,
            seed=seed,
            console=console,
        )
