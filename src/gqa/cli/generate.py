"""``gqa generate``: continue one or more prompts with the static KV cache, streaming the text; with
``--dynamic-grouping`` each prompt's KV heads are clustered on that prompt after the prefill (issue 25)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from gqa.cli.common import DTYPE_HELP, console, model_loader, user_errors
from gqa.errors import GQAUserError


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @user_errors
    def generate_(
        model: Annotated[Path, typer.Argument(help="gqa checkpoint, transformers folder or .gguf file.")],
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Text to continue; repeat for a batch.")],
        max_new_tokens: int = typer.Option(64, help="Tokens to generate per prompt."),
        temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
        top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)."),
        top_p: float = typer.Option(1.0, help="Sample among the most likely tokens reaching this probability."),
        seed: int = typer.Option(None, help="Seed for sampling (prompt i uses seed + i)."),
        tokenizer: Annotated[
            Path | None, typer.Option(help="Tokenizer folder or .gguf (default: MODEL's own).")
        ] = None,
        stream: bool = typer.Option(True, help="Print tokens as they are generated."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object with texts, token ids and timings."),
        dynamic_grouping: bool = typer.Option(
            False,
            "--dynamic-grouping",
            help="After the prefill, cluster each prompt's KV heads per layer on that prompt and decode over one "
            "merged K/V per cluster (needs --kv-fraction or --max-error).",
        ),
        kv_fraction: float = typer.Option(
            None, help="With --dynamic-grouping: share of the KV bytes to keep per layer, in (0, 1]."
        ),
        max_error: float = typer.Option(
            None,
            help="With --dynamic-grouping: merge heads while the mean total-variation distance of a layer's "
            "attention probabilities on the prompt stays at most this (>= 0).",
        ),
        dtype: str = typer.Option(None, help=DTYPE_HELP),
    ) -> None:
        """Generate continuations of --prompt with MODEL (a batch when --prompt is repeated)."""
        from gqa.generation import SamplingParams, generate
        from gqa.generation.stream import TextStream
        from gqa.model import GQAForCausalLM, load_model_tokenizer
        from gqa.progress import load_announced

        SamplingParams(temperature, top_k, top_p, seed)  # reject bad sampling options before loading
        grouping = _grouping(dynamic_grouping, kv_fraction, max_error)  # and bad grouping options
        for i, p in enumerate(prompt):
            if not p:
                raise GQAUserError(f"prompt {i} is empty; give some text to continue")
        if max_new_tokens < 1:
            raise GQAUserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        load_model = model_loader(dtype)  # a bad --dtype fails before anything loads
        tok = load_model_tokenizer(model, tokenizer)
        lm = load_announced(model, load_model)
        if not isinstance(lm, GQAForCausalLM):
            from gqa.families import names

            raise GQAUserError(
                f"{model} is a {type(lm).__name__}; gqa generate runs {'/'.join(names(runs=True))} models"
            )
        ids = [tok.encode(p) for p in prompt]
        for i, p in enumerate(ids):
            if not p:
                raise GQAUserError(f"prompt {i} encodes to no tokens; give some text to continue")

        live = stream and not as_json
        texts = TextStream(tok, len(prompt))
        single = len(prompt) == 1
        display = None
        if live and single:
            sys.stdout.write(prompt[0])
            sys.stdout.flush()
        elif live and console.is_terminal:  # off a terminal (a log, a pipe) the texts are printed at the end
            from rich.live import Live
            from rich.text import Text

            def render() -> Text:
                out = Text()
                for i, p in enumerate(prompt):
                    out.append(f"[{i}] ", style="bold")
                    out.append(p, style="dim")
                    out.append(texts.texts[i] + ("\n" if i < len(prompt) - 1 else ""))
                return out

            display = Live(render(), console=console, refresh_per_second=12, transient=False)
            display.start()

        def on_token(i: int, token: int) -> None:
            delta = texts.push(i, token)
            if live and single and delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
            elif display is not None:
                display.update(render())

        try:
            res = generate(
                lm,
                ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                tokenizer=tok,
                on_token=on_token,
                grouping=grouping,
            )
        finally:
            if display is not None:
                display.update(render())
                display.stop()
        if live and single:
            sys.stdout.write("\n")
        if as_json:
            print(
                json.dumps(
                    {
                        "model": str(model),
                        "prompts": prompt,
                        "texts": res.texts,
                        "tokens": res.tokens,
                        "prefill_s": res.prefill_s,
                        "decode_s": res.decode_s,
                        "decode_tokens_per_s": res.decode_tokens_per_s,
                        **({} if res.grouping is None else {"kv_fraction_held": _fractions_held(lm, res.grouping)}),
                    }
                )
            )
        elif live and not single and display is None:
            for i, (p, t) in enumerate(zip(prompt, res.texts, strict=True)):
                console.print(f"[{i}] {p}{t}", highlight=False, markup=False, soft_wrap=True)  # not re-wrapped
        elif not live:
            for p, t in zip(prompt, res.texts, strict=True):
                console.print(p + t, highlight=False, markup=False, soft_wrap=True)


def _grouping(dynamic: bool, kv_fraction: float | None, max_error: float | None):
    """The ``grouping=`` argument of :func:`gqa.generate` from the flags; bad combinations are one-line errors."""
    from gqa.generation.dynamic import options

    if not dynamic:
        if kv_fraction is not None or max_error is not None:
            raise GQAUserError("--kv-fraction and --max-error apply with --dynamic-grouping; add --dynamic-grouping")
        return "static"
    if (kv_fraction is None) == (max_error is None):
        raise GQAUserError(
            "--dynamic-grouping needs exactly one of --kv-fraction F (0 < F <= 1) and --max-error E (>= 0)"
        )
    if kv_fraction is not None and not 0 < kv_fraction <= 1:  # NaN fails too
        raise GQAUserError(f"--kv-fraction must be in (0, 1], got {kv_fraction}")
    if max_error is not None and not max_error >= 0:
        raise GQAUserError(f"--max-error must be >= 0, got {max_error}")
    return options(kv_fraction=kv_fraction, max_error=max_error)


def _fractions_held(model, grouping) -> list[float]:
    """Per prompt: K plus V slots held over all layers, as a share of the model's own 2 x sum of Hkv."""
    full = 2 * sum(model.config.kv_heads_per_layer)
    return [sum(lg.slots for lg in layers) / full for layers in grouping]


def register_bench(bench: typer.Typer) -> None:
    """Add ``generate`` to the ``gqa bench`` sub-app."""

    @bench.command("generate")
    @user_errors
    def bench_generate(
        model: Annotated[
            Path | None, typer.Argument(help="Model to benchmark (default: the shipped Shakespeare MHA model).")
        ] = None,
        batch_sizes: str = typer.Option("1,2,4,8,16", help="Comma-separated batch sizes."),
        prompt_len: int = typer.Option(32, help="Prompt tokens per sequence."),
        new_tokens: int = typer.Option(64, help="New tokens per sequence."),
        repeats: int = typer.Option(3, help="Timings are the best of this many runs."),
        group_size: int = typer.Option(4, help="Query heads per KV head of the GQA variant."),
        transformers: bool = typer.Option(True, help="Also time transformers' generate on the same weights."),
        budget_sequences: int = typer.Option(4, help="KV budget = what MHA needs for this many sequences."),
        requests: int = typer.Option(48, help="Requests served in the fixed budget."),
        threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
        out: Annotated[
            Path,
            typer.Option(
                help="Folder for the results (.json, .md, .png); recorded results live in benchmarks/results/."
            ),
        ] = Path("results"),
        name: str = typer.Option(None, help="File name stem (default: generate-cpu or generate-cuda)."),
        force: bool = typer.Option(False, "--force", help="Replace results of the same name in --out."),
    ) -> None:
        """Decode tokens/s and KV memory vs batch for MHA / GQA / MQA variants, against transformers."""
        import torch

        from gqa.bench.generate import check_results_free, run_generate_bench, summary_rows, write_generate_results

        try:
            batches = tuple(int(b) for b in batch_sizes.split(","))
        except ValueError:
            raise GQAUserError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
        stem = name or ("generate-cuda" if torch.cuda.is_available() else "generate-cpu")
        check_results_free(out, stem, force)  # before the run, not after it

        def say_estimate(seconds: float) -> None:
            when = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
            console.print(
                f"estimated run time: about {when} (a rough guess from two short timed runs)", highlight=False
            )

        res = run_generate_bench(
            model,
            batch_sizes=batches,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            repeats=repeats,
            group_size=group_size,
            with_transformers=transformers,
            budget_sequences=budget_sequences,
            budget_requests=requests,
            threads=threads,
            on_estimate=say_estimate,
        )
        args = sys.argv[1:]
        if args[:2] == ["bench", "generate"]:
            args = args[2:]
        command = " ".join(["gqa", "bench", "generate", *(shlex.quote(a) for a in args)])
        paths = write_generate_results(res, out, stem, command=command)

        from rich.table import Table

        table = Table(title=f"decode tokens/s, {res['model']} ({res['dtype']}, run {res['elapsed_seconds']:.0f} s)")
        for col in ("variant", "KV heads", "batch", "gqa tok/s", "transformers tok/s", "speedup", "KV cache MiB"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for variant, kv, b, ours, theirs, mib in summary_rows(res):
            table.add_row(
                variant,
                str(kv),
                str(b),
                f"{ours:.0f}",
                "-" if theirs is None else f"{theirs:.0f}",
                "-" if theirs is None else f"{ours / theirs:.2f}x",
                f"{mib:.2f}",
            )
        console.print(table)
        for path in paths:
            console.print(f"wrote {path}")
