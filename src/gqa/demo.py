"""The demo behind ``gqa demo``: what GQA costs and buys, on the shipped Shakespeare MHA model.

1. Evaluate the shipped MHA model (8 query heads, 8 KV heads) on the validation plays.
2. Convert it to GQA-4, GQA-2 and MQA with :func:`gqa.convert.convert` (mean-pooled K/V
   heads, as in the GQA paper; query head h uses KV head h // g), and evaluate each.
3. Uptrain each conversion briefly (by default 5% of the pre-training tokens, the paper's recipe).
4. Print a table (KV heads, KV bytes per token, perplexity after conversion and after uptraining,
   decode tokens/s) and write a PNG plot of perplexity against KV-cache size. Decode tokens/s is
   measured at the end, all models interleaved run by run, best of 3, through ``gqa.generate`` (as
   ``gqa bench generate`` measures it); ``gqa bench generate`` is the fuller measurement.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gqa.atomic import atomic_file
from gqa.errors import GQAUserError
from gqa.model import GQAForCausalLM, load_hf

__all__ = ["DemoRow", "run_demo", "decode_tokens_per_s", "plot_perplexity_vs_kv"]


@dataclass
class DemoRow:
    name: str
    kv_heads: int
    kv_bytes_per_token: int  # fp32 cache, all layers
    ppl_converted: float
    ppl_uptrained: float | None  # None for the MHA original
    decode_tokens_per_s: float
    uptrain_tokens: int = 0


def decode_tokens_per_s(
    model: GQAForCausalLM, context: int = 224, steps: int = 32, batch: int = 1, repeats: int = 3
) -> float:
    """Greedy decode tokens/s after a ``context``-token prompt, measured as ``gqa bench generate`` does
    (:func:`gqa.bench.generate.decode_tokens_per_s`: ``gqa.generate``, best of ``repeats``)."""
    from gqa.bench.generate import decode_tokens_per_s as measure

    return measure({"model": model}, batch=batch, prompt_len=context, new_tokens=steps, repeats=repeats)["model"]


def plot_perplexity_vs_kv(rows: list[DemoRow], path: str | Path, title: str) -> Path:
    """Perplexity (log scale) against KV-cache KiB per token, after conversion and after uptraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    kib = [r.kv_bytes_per_token / 1024 for r in rows]
    ax.plot(kib, [r.ppl_converted for r in rows], "o--", color="tab:red", label="after conversion (mean pool)")
    up = [
        (k, r.ppl_uptrained if r.ppl_uptrained is not None else r.ppl_converted) for k, r in zip(kib, rows, strict=True)
    ]
    ax.plot([k for k, _ in up], [p for _, p in up], "o-", color="tab:blue", label="after uptraining")
    for k, r in zip(kib, rows, strict=True):
        ax.annotate(
            r.name, (k, r.ppl_uptrained or r.ppl_converted), textcoords="offset points", xytext=(4, 6), fontsize=8
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(kib, [f"{k:g}" for k in kib])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    # Label a 1-1.2-1.5-2-3-4-5-6-8 ladder inside the data range: matplotlib's default log ticks leave
    # ranges like 77-160 almost unlabelled.
    values = [p for r in rows for p in (r.ppl_converted, r.ppl_uptrained) if p is not None]
    lo, hi = min(values), max(values)
    ladder = [m * 10**e for e in range(0, 7) for m in (1, 1.2, 1.5, 2, 3, 4, 5, 6, 8)]
    ticks = [t for t in ladder if lo / 1.1 <= t <= hi * 1.1]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("KV cache per token (KiB, fp32)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # the temp name keeps the suffix: it picks the image format
        fig.savefig(tmp)
    plt.close(fig)
    return path


def run_demo(
    *,
    kv_heads: tuple[int, ...] = (4, 2, 1),
    fraction: float = 0.05,
    eval_tokens: int = 16_384,
    plot: str | Path | None = "gqa_demo.png",
    work_dir: str | Path | None = None,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> list[DemoRow]:
    """Convert the shipped MHA model to each of ``kv_heads``, uptrain each on ``fraction`` of its
    pre-training tokens, and report (see the module docstring). Returns one row per model."""
    from gqa.convert import convert
    from gqa.data import encode, load_tokenizer, shakespeare_splits
    from gqa.evaluate import perplexity
    from gqa.train import read_pretrain_tokens, shipped_model_path, uptrain

    console = console or Console()
    src = shipped_model_path()
    n_heads = load_hf(src).config.n_kv_heads
    for h in kv_heads:
        if not isinstance(h, int) or h < 1 or n_heads % h:
            raise GQAUserError(f"kv heads {h} must divide the shipped model's {n_heads} KV heads")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise GQAUserError(f"--plot {plot} must end in .png")
    pretrain_tokens = read_pretrain_tokens(src)
    tok = load_tokenizer(src)
    splits = shakespeare_splits()
    train_ids, val_ids = encode(tok, splits["train"]), encode(tok, splits["validation"])
    seq_len = 256

    def ppl(model) -> float:
        return perplexity(model, val_ids, seq_len=seq_len, max_tokens=eval_tokens).perplexity

    rows: list[DemoRow] = []
    mha = load_hf(src)
    nan = float("nan")  # decode speed: measured for all models together at the end
    rows.append(DemoRow("MHA", n_heads, mha.config.kv_bytes_per_token(torch.float32), ppl(mha), None, nan))
    speed_models = {"MHA": mha}
    console.print(f"MHA (shipped): validation perplexity {rows[0].ppl_converted:.2f}")
    with tempfile.TemporaryDirectory(prefix="gqa-demo-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        for h in kv_heads:
            name = "MQA" if h == 1 else f"GQA-{h}"
            conv = work / f"kv{h}"
            convert(src, conv, kv_heads=h, merge="mean", progress=False)
            model = load_hf(conv, dtype=torch.float32)
            after_convert = ppl(model)
            console.print(
                f"{name}: converted, perplexity {after_convert:.2f}; uptraining on {fraction:.1%} of pre-training"
            )
            res = uptrain(
                model,
                train_ids,
                work / f"kv{h}-uptrained",
                fraction=fraction,
                pretrain_tokens=pretrain_tokens,
                val_ids=val_ids,
                seq_len=seq_len,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                eval_tokens=eval_tokens,
                checkpoint_every=0,
                progress=progress,
            )
            rows.append(
                DemoRow(
                    name,
                    h,
                    model.config.kv_bytes_per_token(torch.float32),
                    after_convert,
                    res.validation.perplexity,
                    nan,
                    res.tokens,
                )
            )
            speed_models[name] = model.eval()
    from gqa.bench.generate import decode_tokens_per_s as measure_decode

    speeds = measure_decode(speed_models)  # interleaved, best of 3: every model sees the same load
    for r in rows:
        r.decode_tokens_per_s = speeds[r.name]
    table = Table(title=f"Shakespeare MHA model -> GQA: {eval_tokens:,} validation tokens, fp32, CPU")
    for col in (
        "model",
        "KV heads",
        "KV bytes/token",
        "ppl converted",
        "ppl uptrained",
        "uptrain tokens",
        "decode tok/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.name,
            str(r.kv_heads),
            f"{r.kv_bytes_per_token:,}",
            f"{r.ppl_converted:.2f}",
            "-" if r.ppl_uptrained is None else f"{r.ppl_uptrained:.2f}",
            f"{r.uptrain_tokens:,}" if r.uptrain_tokens else "-",
            f"{r.decode_tokens_per_s:.0f}",
        )
    console.print(table)
    if plot is not None:
        path = plot_perplexity_vs_kv(rows, plot, "Shakespeare MHA model converted to fewer KV heads")
        console.print(f"plot: {path}")
    return rows


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
