"""``gqa convert``: options generated from :class:`gqa.convert.ConvertOptions`, a call of
:func:`gqa.convert.convert`, its report printed."""

from __future__ import annotations

import contextlib
import inspect
import signal
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import console, dataclass_options, user_errors, with_parameters
from gqa.convert.options import ConvertOptions


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

    if report.latent:
        rope = "in one shared head" if report.latent.get("rope") == "shared" else "per KV group"
        how = f"latent rank {report.latent['rank']}, {report.latent['rope_dim']} rotated dims {rope}"
    else:
        how = f"merge={report.merge}, grouping={report.grouping}" + (", aligned" if report.align else "")
    table = Table(
        title=f"{report.model_type} ({report.layout} layout, {report.path} path), {how}, export={report.export}",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for label, b, a in _layer_runs(report.kv_heads_before, report.kv_heads_after):
        table.add_row(f"KV {'groups' if report.latent else 'heads'}, layers {label}", str(b), str(a))
    if report.latent:
        layers = report.latent["layers"]
        kept = sum(f["kv_energy_kept"] for f in layers) / len(layers)
        table.add_row("K/V energy the latent keeps (mean)", "", f"{kept:.1%}")
        if report.latent.get("rope") == "shared":
            merged = sum(f["rope_merge_kept"] for f in layers) / len(layers)
            table.add_row("rotated key energy the shared head keeps (mean)", "", f"{merged:.1%}")
    kb, ka = report.kv_cache_bytes_per_token_before, report.kv_cache_bytes_per_token_after
    table.add_row(f"KV cache bytes / token ({report.kv_cache_dtype})", f"{kb:,}", f"{ka:,} ({ka / kb:.0%})")
    table.add_row("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,}")
    removed = report.parameters_removed
    table.add_row("parameters removed" if removed >= 0 else "parameters added", "", f"{abs(removed):,}")
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


# SRC and OUT; every option comes from the fields of ConvertOptions (flag, help text, default).
_PATHS = [
    inspect.Parameter(
        "src",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[Path, typer.Argument(help="A transformers model folder (safetensors) or a .gguf file.")],
    ),
    inspect.Parameter(
        "out",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[Path, typer.Argument(help="Output folder (written beside, renamed at the end).")],
    ),
]


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    @with_parameters([*_PATHS, *dataclass_options(ConvertOptions)])
    def convert(src: Path, out: Path, **options) -> None:
        """Convert a checkpoint to other KV-head counts (merging or replicating K/V heads).

        Query head h uses KV head h // (Hq // N) before and after. Writes OUT/conversion_report.json.
        """
        from gqa.convert import convert as run_convert

        with _sigterm_raises():
            report = run_convert(src, out, options=ConvertOptions(**options))
        print_report(report, console)
        console.print(f"wrote {out} in {report.seconds:.1f} s")
