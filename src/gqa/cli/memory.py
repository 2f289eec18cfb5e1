"""``gqa memory``: KV-cache bytes per token / sequence and what fits in a budget, from a config alone."""

from __future__ import annotations

import json

import typer

from gqa.cli.common import console, user_errors


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.4g} {unit}"
    return f"{n} B"


def _window_note(windows: list) -> str:
    """One line on the sliding layers: their ring-buffer caches stop growing at the window."""
    sliding = [w for w in windows if w]
    sizes = ", ".join(f"{w:,}" for w in sorted(set(sliding)))
    return (
        f"{len(sliding)} of {len(windows)} layers attend within a window of {sizes} tokens: their caches are "
        f"ring buffers that stop growing there, so past it memory grows only with the "
        f"{len(windows) - len(sliding)} global layers"
    )


def register(app: typer.Typer) -> None:
    @app.command("memory")
    @user_errors
    def memory(
        model: str = typer.Argument(
            ..., help="config.json, model folder, gqa config file or .gguf (weights are not read)."
        ),
        context: int = typer.Option(None, help="Tokens per sequence (default: the model's max context)."),
        batch: int = typer.Option(1, help="Sequences held at once."),
        budget: float = typer.Option(
            None, help="KV memory budget in GiB: show the largest batch and context that fit."
        ),
        dtype: str = typer.Option("bfloat16", help="Cache element type: bfloat16, float16, float32, float8, int8."),
        as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    ) -> None:
        """KV bytes per token and per sequence for MODEL and its MHA / GQA / MQA variants."""
        from rich.table import Table

        from gqa.memory import memory_report

        rep = memory_report(model, context=context, batch=batch, budget_gib=budget, dtype=dtype)
        if as_json:
            print(json.dumps(rep))
            return
        console.print(
            f"[bold]{rep['model']}[/]: {rep['n_layers']} layers, {rep['n_heads']} query heads, head_dim "
            f"{rep['head_dim']}, {rep['dtype']} cache, context {rep['context']:,}, batch {rep['batch']}"
        )
        table = Table(show_edge=False)
        for col in ("variant", "KV heads", "g", "per token", "per sequence", f"batch of {rep['batch']}"):
            table.add_column(col, justify="left" if col in ("variant", "KV heads") else "right")
        if budget is not None:
            table.add_column(f"max batch @ {rep['context']:,}", justify="right")
            table.add_column(f"max context @ batch {rep['batch']}", justify="right")
        for row in rep["variants"]:
            g = row["group_size"]
            cells = [
                "this model" if row["variant"] == "model" else row["variant"],
                str(h) if isinstance(h := row["kv_heads"], int) else "per layer " + ",".join(map(str, h)),
                "-" if g is None else f"{g:g}",
                _size(row["kv_bytes_per_token"]),
                _size(row["kv_bytes_per_sequence"]),
                _size(row["kv_bytes_total"]),
            ]
            if budget is not None:
                ctx = row["max_context"]
                cells += [f"{row['max_batch']:,}", "unbounded" if ctx is None else f"{ctx:,}"]
            table.add_row(*cells)
        console.print(table)
        if rep["windows"] is not None:
            console.print(_window_note(rep["windows"]))
        if budget is not None:
            console.print(f"budget {budget:g} GiB for the KV cache alone (weights and activations not counted)")
