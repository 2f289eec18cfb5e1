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
        kv_heads: int = typer.Option(
            None, "--kv-heads", help="New number of KV heads; must divide the current number."
        ),
        merge: str = typer.Option(
            "mean",
            help="How a group's K/V heads are pooled: mean (the GQA paper), first, random; with --calib also "
            "weighted, lsq, or fit (the best measured of mean, weighted and lsq per layer).",
        ),
        dtype: str = typer.Option(None, help="Output dtype: float32, bfloat16 or float16 (default: as the source)."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
        seed: int = typer.Option(0, help="Seed for --merge random."),
        grouping: str = typer.Option(
            "contiguous", help="Which heads share: contiguous (neighbours) or similarity (needs --calib)."
        ),
        calib: str = typer.Option(
            None, help="Calibration text (shakespeare:train, a file or folder): align heads before merging."
        ),
        calib_tokens: int = typer.Option(65536, "--calib-tokens", help="Calibration tokens to run."),
        kv_budget: float = typer.Option(
            None, "--kv-budget", help="Fraction of the original KV-cache bytes; per-layer heads chosen to fit."
        ),
        kv_heads_per_layer: str = typer.Option(
            None, "--kv-heads-per-layer", help="KV heads per layer, e.g. 4,4,2,... (divisors of each layer's)."
        ),
        export: str = typer.Option("hf", help="Output layout: hf (transformers) or decilm (block_configs)."),
    ) -> None:
        """Convert a checkpoint to fewer KV heads by pooling each group's K/V projection heads.

        Query head h uses KV head h // (Hq // N) before and after. Writes OUT/conversion_report.json.
        """
        calibrated = (
            calib is not None
            or grouping != "contiguous"
            or merge in ("weighted", "lsq", "fit")
            or kv_budget is not None
            or kv_heads_per_layer is not None
            or export != "hf"
        )
        if calibrated:  # activation-aware grouping, variable GQA, DeciLM export: gqa.grouping
            from gqa.convert import OUTPUT_DTYPES
            from gqa.grouping import convert_grouped

            if dtype is not None and dtype not in OUTPUT_DTYPES:
                raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
            rep = convert_grouped(
                src,
                out,
                kv_heads=kv_heads,
                kv_heads_per_layer=kv_heads_per_layer,
                kv_budget=kv_budget,
                grouping=grouping,
                merge=merge,
                align=calib is not None,
                calib=calib,
                calib_tokens=calib_tokens,
                export=export,
                dtype=OUTPUT_DTYPES.get(dtype),
                force=force,
            )
            kb, ka = rep["kv_cache_bytes_per_token_before"], rep["kv_cache_bytes_per_token_after"]
            console.print(f"KV heads per layer: {','.join(map(str, rep['kv_heads_after']))}")
            console.print(f"KV cache bytes / token ({rep['kv_cache_dtype']}): {kb:,} -> {ka:,} ({ka / kb:.0%})")
            console.print(f"wrote {out} in {rep['seconds']:.1f} s")
            return
        if kv_heads is None:
            raise ValueError("--kv-heads is required (or --kv-heads-per-layer / --kv-budget with --calib)")
        from gqa.convert import convert_checkpoint

        report = convert_checkpoint(src, out, kv_heads, merge=merge, dtype=dtype, force=force, seed=seed)
        print_report(report, console)
        console.print(f"wrote {out} in {report.seconds:.1f} s")
