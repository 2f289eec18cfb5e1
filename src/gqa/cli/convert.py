"""``gqa convert``: parse the options, call :func:`gqa.convert.convert`, print its report."""

from __future__ import annotations

import contextlib
import signal
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
    """The conversion summary: KV heads per layer, KV-cache bytes per token, parameters, distillation."""
    from rich.table import Table

    how = f"merge={report.merge}, grouping={report.grouping}" + (", aligned" if report.align else "")
    table = Table(
        title=f"{report.model_type} ({report.layout} layout, {report.path} path), {how}, export={report.export}",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for label, b, a in _layer_runs(report.kv_heads_before, report.kv_heads_after):
        table.add_row(f"KV heads, layers {label}", str(b), str(a))
    kb, ka = report.kv_cache_bytes_per_token_before, report.kv_cache_bytes_per_token_after
    table.add_row(f"KV cache bytes / token ({report.kv_cache_dtype})", f"{kb:,}", f"{ka:,} ({ka / kb:.0%})")
    table.add_row("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,}")
    table.add_row("parameters removed", "", f"{report.parameters_removed:,}")
    if report.distill is not None:
        layers = report.distill.get("layers") or []
        before = sum(x["error_before"] for x in layers) / max(len(layers), 1)
        after = sum(x["error_after"] for x in layers) / max(len(layers), 1)
        table.add_row("distilled layer error (mean, held out)", f"{before:.3g}", f"{after:.3g}")
    console.print(table)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (timeouts, SLURM, systemd, docker stop) raises SystemExit(143) inside the conversion, so the
    temporary ``.OUT.partial-*`` folder is removed like on any other error; the old handler comes back after."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def convert(
        src: Annotated[Path, typer.Argument(help="A transformers model folder (safetensors) or a .gguf file.")],
        out: Annotated[Path, typer.Argument(help="Output folder (written beside, renamed at the end).")],
        kv_heads: int = typer.Option(
            None,
            "--kv-heads",
            help="New KV heads in every layer: a divisor of the current number (merge) or a multiple of it "
            "dividing the query heads (replicate heads, exact).",
        ),
        kv_heads_per_layer: str = typer.Option(
            None, "--kv-heads-per-layer", help="KV heads per layer, e.g. 4,4,2,... (each as for --kv-heads)."
        ),
        kv_budget: float = typer.Option(
            None,
            "--kv-budget",
            help="Fraction of the original KV-cache bytes; per-layer heads chosen to fit (needs --calib).",
        ),
        merge: str = typer.Option(
            "mean",
            help="How a group's K/V heads are pooled: mean (the GQA paper), first, random; with --calib also "
            "weighted, lsq, or fit (the best measured of mean, weighted and lsq per layer).",
        ),
        grouping: str = typer.Option(
            "contiguous", help="Which heads share: contiguous (neighbours) or similarity (needs --calib)."
        ),
        calib: str = typer.Option(
            None, help="Calibration text (a file, a folder, shakespeare:train, ...): align heads before merging."
        ),
        calib_tokens: int = typer.Option(65536, "--calib-tokens", help="Calibration tokens to run."),
        distill: str = typer.Option(
            None, help="local: fit each reduced attention layer to the original on the calibration text."
        ),
        distill_steps: int = typer.Option(150, "--distill-steps", help="Adam steps per layer for --distill."),
        distill_params: str = typer.Option(
            "qkvo", "--distill-params", help="What --distill fits: qkvo (Q, K, V and O) or kv (K and V only)."
        ),
        distill_inputs: str = typer.Option(
            "converted",
            "--distill-inputs",
            help="Layer inputs for --distill: converted (the new model's own, which also corrects the drift of "
            "earlier layers) or original (the source model's).",
        ),
        distill_lr: float = typer.Option(3e-3, "--distill-lr", help="Adam's peak learning rate for --distill."),
        export: str = typer.Option(
            "hf",
            help="Output layout: hf (transformers), decilm (block_configs), gguf (llama.cpp; needs SRC's tokenizer).",
        ),
        dtype: str = typer.Option(None, help="Output dtype: float32, bfloat16 or float16 (default: as the source)."),
        seed: int = typer.Option(0, help="Seed for --merge random and --distill."),
        force: bool = typer.Option(
            False, "--force", help="Replace OUT if gqa convert wrote it (its conversion_report.json is there)."
        ),
    ) -> None:
        """Convert a checkpoint to other KV-head counts (merging or replicating K/V heads).

        Query head h uses KV head h // (Hq // N) before and after. Writes OUT/conversion_report.json.
        """
        from gqa.convert import convert as run_convert

        with _sigterm_raises():
            report = run_convert(
                src,
                out,
                kv_heads=kv_heads,
                kv_heads_per_layer=kv_heads_per_layer,
                kv_budget=kv_budget,
                grouping=grouping,
                merge=merge,
                calib=calib,
                calib_tokens=calib_tokens,
                export=export,
                dtype=dtype,
                seed=seed,
                force=force,
                distill=distill,
                distill_steps=distill_steps,
                distill_params=distill_params,
                distill_inputs=distill_inputs,
                distill_lr=distill_lr,
            )
        print_report(report, console)
        console.print(f"wrote {out} in {report.seconds:.1f} s")
