"""``gqa convert``: a checkpoint to fewer KV heads (the GQA paper's mean pooling), thin over
:func:`gqa.convert.convert_checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import console, user_errors


def _layer_runs(before: list[int], after: list[int]) -> list[tuple[str, int, int]]:
    """Consecutive layers with the same (before, after) heads -> ("0-29", before, after) rows."""
    runs, start = [], 0
    for i in range(1, len(before) + 1):
        if i == len(before) or (before[i], after[i]) != (before[start], after[start]):
            label = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append((label, before[start], after[start]))
            start = i
    return runs


def print_report(report, console) -> None:
    """The conversion summary: KV heads per layer, KV-cache bytes per token and parameters."""
    from rich.table import Table

    table = Table(title=f"{report.model_type} ({report.layout} layout), merge={report.merge}", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for label, b, a in _layer_runs(report.kv_heads_before, report.kv_heads_after):
        table.add_row(f"KV heads, layers {label}", str(b), str(a))
    kb, ka = report.kv_cache_bytes_per_token_before, report.kv_cache_bytes_per_token_after
    table.add_row(f"KV cache bytes / token ({report.kv_cache_dtype})", f"{kb:,}", f"{ka:,} ({ka / kb:.0%})")
    table.add_row("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,}")
    table.add_row("parameters removed", "", f"{report.parameters_removed:,}")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def convert(
        src: Annotated[Path, typer.Argument(help="A transformers model folder (safetensors) or a .gguf file.")],
        out: Annotated[Path, typer.Argument(help="Output folder (a transformers model folder).")],
        kv_heads: int = typer.Option(..., "--kv-heads", help="New number of KV heads; must divide the current number."),
        merge: str = typer.Option(
            "mean", help="How a group's K/V heads are pooled: mean (the GQA paper), first, random."
        ),
        dtype: str = typer.Option(None, help="Output dtype: float32, bfloat16 or float16 (default: as the source)."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
        seed: int = typer.Option(0, help="Seed for --merge random."),
    ) -> None:
        """Convert a checkpoint to fewer KV heads by pooling each group's K/V projection heads.

        Query head h uses KV head h // (Hq // N) before and after. Writes OUT/conversion_report.json.
        """
        from gqa.convert import convert_checkpoint

        report = convert_checkpoint(src, out, kv_heads, merge=merge, dtype=dtype, force=force, seed=seed)
        print_report(report, console)
        console.print(f"wrote {out} in {report.seconds:.1f} s")
