"""``gqa bench``: benchmarks with provenance. Each benchmark is one command on the ``bench`` sub-app;
add one with ``@bench_app.command("name")`` and the ``user_errors`` decorator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import console, user_errors
from gqa.errors import GQAUserError

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks; results with provenance (.json, .md, .png) in --out (default ./results).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_RESULTS = "results"  # git-ignored; recorded results in benchmarks/results/ are replaced only with --force


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("attention")
@user_errors
def attention(
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    quick: bool = typer.Option(False, "--quick", help="Two small cases, short timings (a smoke test)."),
    full: bool = typer.Option(False, "--full", help="Every case: GQA, MQA and MHA at 4k-128k keys and batch 32 (long on CPU; memory-capped)."),
    flex: bool = typer.Option(True, "--flex/--no-flex", help="Time compiled FlexAttention (compiles per shape)."),
    min_time: float | None = typer.Option(None, help="Seconds of timed calls per measurement (default 1, quick 0.3)."),
    max_iters: int = typer.Option(10, help="At most this many timed calls per measurement."),
    max_memory_gb: float = typer.Option(8.0, help="Skip cases whose cache (plus repeat_kv's copy) needs more."),
    threads: int | None = typer.Option(None, help="CPU threads for every implementation (default: torch's)."),
    out: Annotated[Path, typer.Option(help="Directory for the results (.json, .md, .png).")] = Path(DEFAULT_RESULTS),
    force: bool = typer.Option(False, "--force", help="Replace results of the same name in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Decode attention (Tq = 1) vs SDPA (each backend), repeat_kv + SDPA and FlexAttention."""
    from gqa.bench.attention import check_results_free, run_attention_bench, summary_rows, write_results

    if quick and full:
        raise GQAUserError("pass at most one of --quick and --full")
    if max_iters < 1 or (min_time is not None and min_time < 0):
        raise GQAUserError("--max-iters must be >= 1 and --min-time >= 0")
    mode = "quick" if quick else "full" if full else "default"
    command = f"gqa bench attention --device {device} --dtype {dtype}" + (f" --{mode}" if mode != "default" else "")
    command += "" if flex else " --no-flex"
    if min_time is not None:
        command += f" --min-time {min_time:g}"
    if threads is not None:
        command += f" --threads {threads}"
    command += f" --max-iters {max_iters} --max-memory-gb {max_memory_gb:g} --out {out}" + (
        " --json" if as_json else ""
    )
    # before the run, not after it
    check_results_free(out, device=device, dtype=dtype, mode=mode, threads=threads, force=force)
    results = run_attention_bench(
        device=device,
        dtype=dtype,
        mode=mode,
        min_time=min_time,
        max_iters=max_iters,
        max_memory_gb=max_memory_gb,
        flex=flex,
        progress=not as_json,
        command=command,
        threads=threads,
    )
    paths = write_results(results, out, force=force)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"decode attention, {results['provenance']['machine']} ({dtype})")
    for col in ("case", "fastest peer", "peer time / gqa time", "gqa GB/s", "gqa / copy BW"):
        table.add_column(col, justify="left" if col in ("case", "fastest peer") else "right")
    for name, peer, ratio, gbps, frac in summary_rows(results):
        table.add_row(name, peer, f"{ratio:.2f}x", f"{gbps:.1f}", f"{frac:.0%}")
    console.print(table)
    console.print(f"results: {paths['md']}, {paths['json']}, {paths['png']}")


@bench_app.command("cpu-decode")
@user_errors
def cpu_decode(
    dtypes: str = typer.Option("float32,bfloat16", help="Comma-separated: float32 and/or bfloat16."),
    rounds: int = typer.Option(7, help="Round-robin rounds over the peers; GB/s from each peer's best round."),
    threads: int | None = typer.Option(None, help="CPU threads (default: torch's)."),
    out: Annotated[Path, typer.Option(help="Directory for the results (.json, .md, .png).")] = Path(DEFAULT_RESULTS),
    force: bool = typer.Option(False, "--force", help="Replace results of the same name in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """CPU decode attention: the fused C++ kernel vs read bandwidth, grouped matmul, SDPA, previous path."""
    from gqa.bench.attention import run_cpu_decode_bench, write_cpu_decode_results

    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    command = f"gqa bench cpu-decode --dtypes {','.join(names)} --rounds {rounds}"
    command += (f" --threads {threads}" if threads is not None else "") + f" --out {out}"
    results = run_cpu_decode_bench(dtypes=names, rounds=rounds, threads=threads, progress=not as_json, command=command)
    paths = write_cpu_decode_results(results, out, force=force)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    from rich.table import Table

    table = Table(title="CPU decode attention: the fused kernel's ratios (goals: >= 60% read BW, 1.3x, 2x)")
    for col in ("dtype", "case", "fused GB/s", "of read BW", "x grouped matmul", "x SDPA", "x previous"):
        table.add_column(col, justify="left" if col in ("dtype", "case") else "right")
    for r in results["rows"]:
        f = r.get("fused_ratios")
        if f is None:
            table.add_row(r["dtype"], r["case"], "fused kernel not available", "", "", "", "")
            continue
        fused = r["peers"]["gqa fused C++"]
        table.add_row(
            r["dtype"],
            r["case"],
            f"{fused['gbps']:.1f}",
            f"{f['of_read_bw']:.0%}",
            f"{f['x_grouped_matmul']:.2f}x",
            f"{f['x_sdpa_enable_gqa']:.2f}x",
            f"{f['x_previous_path']:.2f}x",
        )
    console.print(table)
    console.print(f"results: {paths['md']}, {paths['json']}, {paths['png']}")


# `gqa bench generate` lives with the generate command.
from gqa.cli.generate import register_bench as _register_generate_bench  # noqa: E402

_register_generate_bench(bench_app)
