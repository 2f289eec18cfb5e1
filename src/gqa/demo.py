"""The demo behind ``gqa demo``: what GQA costs and buys, on the shipped Shakespeare MHA model.

1. Evaluate the shipped MHA model (8 query heads, 8 KV heads) on the validation plays.
2. For each KV-head count (GQA-4, GQA-2, MQA; query head h uses KV head h // g) and each recipe:

   - **paper** (the GQA paper): contiguous groups, mean-pooled K/V heads
     (:func:`gqa.convert.convert` with ``merge="mean"``), then uptraining of all weights with the
     language-model loss on ``fraction`` (default 5%) of the pre-training tokens;
   - **ours** (the project's recipe): calibrated on the training plays (``shakespeare:train``, never the
     validation plays): similarity grouping of aligned heads, fitted merge, local distillation of
     Q/K/V/O layer by layer (``convert(..., grouping="similarity", merge="fit", distill="local")``), then
     end-to-end distillation (KL to the MHA model, ``distill_alpha=1``) of the attention weights on the
     same token budget as the paper's uptraining.

3. Evaluate every model after conversion and after uptraining: validation perplexity, and the KL from the
   MHA model (a recipe can lower perplexity by drifting away from the original: the KL shows it).
4. Print a table (KV heads, KV bytes per token, both recipes side by side, decode tokens/s) and write a
   PNG plot of perplexity and KL against KV-cache size. Decode tokens/s is a property of the shape,
   measured once per KV-head count at the end, all models interleaved run by run, best of 3, through
   ``gqa.generate`` (as ``gqa bench generate`` measures it); ``gqa bench generate`` is the fuller measurement.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gqa.atomic import atomic_file
from gqa.errors import GQAUserError
from gqa.model import GQAForCausalLM, load_hf
from gqa.units import dtype_name

__all__ = [
    "DemoRow",
    "RecipeResult",
    "RECIPES",
    "parse_recipes",
    "run_demo",
    "decode_tokens_per_s",
    "plot_perplexity_vs_kv",
]

RECIPES = ("paper", "ours")
RECIPE_LABELS = {"paper": "paper", "ours": "ours"}
CALIB_SPEC = "shakespeare:train"  # calibration and training text: the training plays only
# Local-distillation Adam steps per layer in the demo: `gqa convert --distill local` defaults to 150; the demo
# uses fewer so that a new user's first run stays a few minutes on a CPU (100 steps were not measured against
# 150 on this model; docs/results/recover-quality.md has the 150-step numbers).
DEMO_DISTILL_STEPS = 100
DEMO_CALIB_TOKENS = 16_384  # 64 sequences of 256 tokens, as in docs/results/recover-quality.md


@dataclass
class RecipeResult:
    """One recipe at one KV-head count. KL: mean KL(MHA || model) in nats/token on the validation text."""

    ppl_converted: float
    kl_converted: float
    ppl_uptrained: float
    kl_uptrained: float
    uptrain_tokens: int
    convert_seconds: float
    uptrain_seconds: float


@dataclass
class DemoRow:
    """One model shape. The MHA original has ``perplexity`` and no recipes; each GQA row has one
    :class:`RecipeResult` per recipe run (keys from :data:`RECIPES`)."""

    name: str
    kv_heads: int
    kv_bytes_per_token: int  # fp32 cache, all layers
    decode_tokens_per_s: float
    perplexity: float | None = None  # the MHA original only
    recipes: dict[str, RecipeResult] = field(default_factory=dict)


def parse_recipes(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"paper,ours"`` (or a sequence of names) -> the recipes in :data:`RECIPES` order; one-line error otherwise."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    bad = [n for n in names if n not in RECIPES]
    if bad or not names:
        got = f"unknown recipe {bad[0]!r}" if bad else "no recipe given"
        raise GQAUserError(f"--recipes: {got}; choose one or more of {', '.join(RECIPES)}, e.g. --recipes paper,ours")
    return tuple(r for r in RECIPES if r in names)


def decode_tokens_per_s(
    model: GQAForCausalLM, context: int = 224, steps: int = 32, batch: int = 1, repeats: int = 3
) -> float:
    """Greedy decode tokens/s after a ``context``-token prompt, measured as ``gqa bench generate`` does
    (:func:`gqa.bench.generate.decode_tokens_per_s`: ``gqa.generate``, best of ``repeats``)."""
    from gqa.bench.generate import decode_tokens_per_s as measure

    return measure({"model": model}, batch=batch, prompt_len=context, new_tokens=steps, repeats=repeats)["model"]


_STYLE = {"paper": ("tab:red", "paper (contiguous, mean pool)"), "ours": ("tab:blue", "ours (aligned, fit, distilled)")}


def _log_ticks(ax, values: list[float]) -> None:
    """Label a 1-1.2-1.5-2-3-4-5-6-8 ladder (1-2-5 over wide ranges) inside the data range: matplotlib's
    default log ticks leave ranges like 77-160 almost unlabelled."""
    import matplotlib.ticker

    lo, hi = min(values), max(values)
    steps = (1, 1.2, 1.5, 2, 3, 4, 5, 6, 8) if hi / lo < 20 else (1, 2, 5)  # wide ranges: fewer labels
    ladder = [m * 10**e for e in range(-4, 7) for m in steps]
    ticks = [t for t in ladder if lo / 1.1 <= t <= hi * 1.1]
    if len(ticks) < 2:  # a narrow range: let matplotlib choose
        return
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def plot_perplexity_vs_kv(rows: list[DemoRow], path: str | Path, title: str) -> Path:
    """Left: validation perplexity (log scale) against KV-cache KiB per token, each recipe after conversion
    (dashed) and after uptraining (solid), starting from the MHA original. Right: the KL from the MHA model."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays as it was

    path = Path(path)
    recipes = [r for r in RECIPES if any(r in row.recipes for row in rows)]
    fig = Figure(figsize=(10.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax, ax_kl = fig.subplots(1, 2)
    mha = next((row for row in rows if row.perplexity is not None), None)
    ppl_values = [mha.perplexity] if mha else []
    kl_values = []
    for recipe in recipes:
        color, label = _STYLE[recipe]
        sub = [row for row in rows if recipe in row.recipes]
        kib = [row.kv_bytes_per_token / 1024 for row in sub]
        res = [row.recipes[recipe] for row in sub]
        start_x = [mha.kv_bytes_per_token / 1024] if mha else []
        start_y = [mha.perplexity] if mha else []
        ax.plot(start_x + kib, start_y + [x.ppl_converted for x in res], "o--", color=color, alpha=0.7,
                label=f"{label}: converted")  # fmt: skip
        ax.plot(start_x + kib, start_y + [x.ppl_uptrained for x in res], "o-", color=color,
                label=f"{label}: + {'uptrained' if recipe == 'paper' else 'distilled end to end'}")  # fmt: skip
        ax_kl.plot(kib, [x.kl_converted for x in res], "o--", color=color, alpha=0.7)
        ax_kl.plot(kib, [x.kl_uptrained for x in res], "o-", color=color)
        ppl_values += [v for x in res for v in (x.ppl_converted, x.ppl_uptrained)]
        kl_values += [v for x in res for v in (x.kl_converted, x.kl_uptrained)]
    names = {row.kv_bytes_per_token / 1024: row.name for row in rows}
    kib_all = sorted(names)
    for a in (ax, ax_kl):
        a.set_xscale("log", base=2)
        a.set_xticks(kib_all, [f"{k:g}\n{names[k]}" for k in kib_all])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_yscale("log")
        a.set_xlabel("KV cache per token (KiB, fp32)")
        a.grid(True, which="both", alpha=0.3)
    _log_ticks(ax, ppl_values)
    positive_kl = [v for v in kl_values if v > 0]
    if positive_kl:
        _log_ticks(ax_kl, positive_kl)
    ax.set_ylabel("validation perplexity")
    ax_kl.set_ylabel("KL(MHA || model), nats/token")
    ax.set_title(title, fontsize=9)
    ax_kl.set_title("distance from the original (lower: more faithful)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()  # below both panels: it hides no line
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    with atomic_file(path) as tmp:  # the temp name keeps the suffix: it picks the image format
        fig.savefig(tmp)
    return path


def _check_options(kv_heads, n_heads, recipes, fraction, eval_tokens, distill_steps, calib_tokens, plot, work_dir):
    for h in kv_heads:
        if isinstance(h, bool) or not isinstance(h, int) or h < 1 or n_heads % h:
            raise GQAUserError(f"kv heads {h} must divide the shipped model's {n_heads} KV heads")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise GQAUserError(f"--fraction must be in (0, 1], got {fraction}; pick e.g. --fraction 0.05")
    for name, value in (("--eval-tokens", eval_tokens), ("--distill-steps", distill_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GQAUserError(f"{name} must be a whole number >= 1, got {value!r}")
    if "ours" in recipes and (
        isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 256
    ):
        raise GQAUserError(f"calib_tokens must be a whole number >= 256 (one sequence), got {calib_tokens!r}")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise GQAUserError(f"--plot {plot} must end in .png")
    if work_dir is not None:
        work = Path(work_dir)
        if work.exists() and not work.is_dir():
            raise GQAUserError(f"--work-dir {work} is a file; give a folder (it is created if missing)")
        taken = sorted(p.name for p in work.glob("kv*")) if work.is_dir() else []
        if taken:
            raise GQAUserError(
                f"--work-dir {work} already holds models of an earlier demo ({taken[0]}); "
                "give a new folder or remove them"
            )


def run_demo(
    *,
    kv_heads: tuple[int, ...] = (4, 2, 1),
    recipes: str | tuple[str, ...] = RECIPES,
    fraction: float = 0.05,
    eval_tokens: int = 16_384,
    plot: str | Path | None = "gqa_demo.png",
    work_dir: str | Path | None = None,
    lr: float = 1e-3,
    distill_lr: float = 3e-4,
    distill_steps: int = DEMO_DISTILL_STEPS,
    calib_tokens: int = DEMO_CALIB_TOKENS,
    batch_size: int = 16,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> list[DemoRow]:
    """Convert the shipped MHA model to each of ``kv_heads`` with each of ``recipes`` (``"paper"``,
    ``"ours"``: see the module docstring), uptrain each on ``fraction`` of its pre-training tokens, and
    report. ``lr``: the paper's uptraining learning rate; ``distill_lr``: ours (end-to-end distillation);
    ``distill_steps``: local-distillation steps per layer; ``calib_tokens``: calibration tokens of the
    training plays for ours. Returns one :class:`DemoRow` per model shape, the MHA original first."""
    from gqa.convert import convert
    from gqa.data import encode, load_tokenizer, shakespeare_splits
    from gqa.evaluate import evaluate_lm
    from gqa.train import read_pretrain_tokens, shipped_model_path, uptrain

    console = console or Console()
    recipes = parse_recipes(recipes)
    src = shipped_model_path()
    n_heads = load_hf(src).config.n_kv_heads
    _check_options(kv_heads, n_heads, recipes, fraction, eval_tokens, distill_steps, calib_tokens, plot, work_dir)
    pretrain_tokens = read_pretrain_tokens(src)
    tok = load_tokenizer(src)
    splits = shakespeare_splits()
    train_ids, val_ids = encode(tok, splits["train"]), encode(tok, splits["validation"])
    seq_len = 256
    mha = load_hf(src).eval()

    def evaluate(model) -> tuple[float, float]:
        res = evaluate_lm(model, val_ids, teacher=mha, seq_len=seq_len, max_tokens=eval_tokens)
        return res.perplexity, res.kl

    mha_ppl = evaluate_lm(mha, val_ids, seq_len=seq_len, max_tokens=eval_tokens).perplexity
    nan = float("nan")  # decode speed: measured for all shapes together at the end
    rows = [DemoRow("MHA", n_heads, mha.config.kv_bytes_per_token(torch.float32), nan, perplexity=mha_ppl)]
    speed_models = {"MHA": mha}
    console.print(f"MHA (shipped): validation perplexity {mha_ppl:.2f}")
    if "ours" in recipes:
        short = " (the demo's short setting; gqa convert defaults to 150)" if distill_steps < 150 else ""
        console.print(
            f"ours: calibrated on {calib_tokens:,} tokens of {CALIB_SPEC}; local distillation {distill_steps} "
            f"steps per layer{short}",
            highlight=False,
            emoji=False,
        )
    with tempfile.TemporaryDirectory(prefix="gqa-demo-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        for h in kv_heads:
            name = "MQA" if h == 1 else f"GQA-{h}"
            row = None
            for recipe in recipes:
                conv = work / (f"kv{h}" if recipe == "paper" else f"kv{h}-ours")
                t0 = time.perf_counter()
                if recipe == "paper":
                    convert(src, conv, kv_heads=h, merge="mean", progress=False)
                else:
                    convert(
                        src,
                        conv,
                        kv_heads=h,
                        calib=CALIB_SPEC,
                        calib_tokens=calib_tokens,
                        grouping="similarity",
                        merge="fit",
                        distill="local",
                        distill_steps=distill_steps,
                        distill_params="qkvo",
                        distill_inputs="converted",
                        seed=seed,
                        progress=progress,
                    )
                convert_s = time.perf_counter() - t0
                model = load_hf(conv, dtype=torch.float32)
                ppl_c, kl_c = evaluate(model)
                what = "mean pool" if recipe == "paper" else "aligned + fit + local distillation"
                how = "uptraining (LM loss)" if recipe == "paper" else "end-to-end distillation from MHA"
                console.print(
                    f"{name} {recipe}: converted ({what}), perplexity {ppl_c:.2f}, KL {kl_c:.4f}; "
                    f"{how} on {fraction:.1%} of pre-training"
                )
                settings = (
                    {"lr": lr}
                    if recipe == "paper"
                    else {"lr": distill_lr, "distill_alpha": 1.0, "train_params": "attention"}
                )
                t0 = time.perf_counter()
                res = uptrain(
                    model,
                    train_ids,
                    work / (f"kv{h}-uptrained" if recipe == "paper" else f"kv{h}-ours-distilled"),
                    fraction=fraction,
                    pretrain_tokens=pretrain_tokens,
                    teacher=mha if recipe == "ours" else None,
                    val_ids=val_ids,  # training.json records the validation perplexity, as gqa uptrain does
                    eval_tokens=eval_tokens,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    seed=seed,
                    checkpoint_every=0,
                    progress=progress,
                    **settings,
                )
                uptrain_s = time.perf_counter() - t0
                ppl_u, kl_u = evaluate(model)
                if row is None:
                    row = DemoRow(name, h, model.config.kv_bytes_per_token(torch.float32), nan)
                    rows.append(row)
                    speed_models[name] = model.eval()  # one model per shape: speed depends on the shape only
                row.recipes[recipe] = RecipeResult(ppl_c, kl_c, ppl_u, kl_u, res.tokens, convert_s, uptrain_s)
    from gqa.bench.generate import decode_tokens_per_s as measure_decode

    speeds = measure_decode(speed_models)  # interleaved, best of 3: every model sees the same load
    for r in rows:
        r.decode_tokens_per_s = speeds[r.name]
    p = next(mha.parameters())
    console.print(demo_table(rows, recipes, eval_tokens, setting=f"{dtype_name(p.dtype)}, {p.device.type.upper()}"))
    _print_notes(console, rows, recipes, distill_steps, calib_tokens)
    if plot is not None:
        path = plot_perplexity_vs_kv(rows, plot, "Shakespeare MHA model converted to fewer KV heads")
        console.print(f"plot: {path}")
    return rows


def demo_table(rows: list[DemoRow], recipes: tuple[str, ...], eval_tokens: int, *, setting: str) -> Table:
    """The demo's table: one row per shape and recipe (the recipes of a shape next to each other), perplexity
    and KL to the original after conversion and after uptraining; KV bytes and decode speed once per shape."""
    from rich import box

    table = Table(
        title=f"Shakespeare MHA model -> GQA: {eval_tokens:,} validation tokens, {setting}",
        box=box.SIMPLE_HEAD,
        padding=(0, 0),  # 9 columns in 80 characters (a log's default width): the box's spaces separate them
        show_edge=False,
    )
    for col in (
        "model",
        "KV\nheads",
        "KV bytes\n/token",
        "recipe",
        "ppl\nconverted",
        "ppl\nuptrained",
        "KL to MHA\nconverted",
        "KL to MHA\nuptrained",
        "decode\ntok/s",
    ):
        table.add_column(col, justify="left" if col in ("model", "recipe") else "right")
    for i, row in enumerate(rows):
        shape = [row.name, str(row.kv_heads), f"{row.kv_bytes_per_token:,}"]
        speed = f"{row.decode_tokens_per_s:.0f}" if math.isfinite(row.decode_tokens_per_s) else "-"
        last = i == len(rows) - 1
        if row.perplexity is not None:  # the original
            table.add_row(*shape, "original", f"{row.perplexity:.2f}", "-", "-", "-", speed, end_section=not last)
            continue
        present = [r for r in recipes if r in row.recipes]
        for j, recipe in enumerate(present):
            x = row.recipes[recipe]
            table.add_row(
                *(shape if j == 0 else ["", "", ""]),
                RECIPE_LABELS[recipe],
                f"{x.ppl_converted:.2f}",
                f"{x.ppl_uptrained:.2f}",
                f"{x.kl_converted:.4f}",
                f"{x.kl_uptrained:.4f}",
                speed if j == 0 else "",
                end_section=j == len(present) - 1 and not last,
            )
    return table


def _print_notes(console: Console, rows, recipes, distill_steps: int, calib_tokens: int) -> None:
    lines = []
    if "paper" in recipes:
        lines.append(
            "paper: contiguous groups, mean-pooled K/V heads; then uptraining of all weights with the LM loss."
        )
    if "ours" in recipes:
        lines.append(
            f"ours: calibrated on {calib_tokens:,} tokens of {CALIB_SPEC}: similarity grouping of aligned heads, "
            f"fitted merge, local distillation of Q/K/V/O ({distill_steps} steps per layer); then end-to-end "
            "distillation (KL to the MHA model) of the attention weights, same tokens as the paper's uptraining."
        )
    tokens = next((x.uptrain_tokens for r in rows for x in r.recipes.values()), 0)
    lines.append(f"uptraining: {tokens:,} tokens per model, the same for every recipe.")
    lines.append(
        "KL to MHA: KL(MHA || model) in nats/token on the validation plays; lower perplexity with a higher KL "
        "is a model drifting away from the original, not a more faithful conversion."
    )
    for recipe in recipes:
        conv = sum(r.recipes[recipe].convert_seconds for r in rows if recipe in r.recipes)
        up = sum(r.recipes[recipe].uptrain_seconds for r in rows if recipe in r.recipes)
        lines.append(f"wall time, {recipe}: conversion {conv:.0f} s, uptraining {up:.0f} s")
    for line in lines:
        console.print(line, highlight=False, markup=False, emoji=False)


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
