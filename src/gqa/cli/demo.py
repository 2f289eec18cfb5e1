"""``gqa demo``: what GQA buys, on a small model — KV-cache bytes and decode speed for MHA/GQA/MQA."""

from __future__ import annotations

import typer

from gqa.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def demo(
        context: int = typer.Option(2048, help="Tokens in the cache when decode is timed."),
        steps: int = typer.Option(32, help="Decode steps timed per variant."),
        seed: int = typer.Option(0, help="Random seed."),
    ) -> None:
        """Show attention and KV-cache savings for MHA vs GQA vs MQA on a small model."""
        from gqa.demo import attention_demo

        attention_demo(context=context, steps=steps, seed=seed, console=console)
