"""Dynamic grouping (issue 25) against static contiguous grouping at the same KV bytes, no training.

On the shipped Shakespeare MHA model (8 heads) and held-out text (``shakespeare:validation``), each window
is a prompt of ``--prompt`` tokens then ``--cont`` continuation tokens. The prompt is prefilled with every
head; the cache is then merged (dynamic: clustered on this prompt, :mod:`gqa.generation.dynamic`; static:
heads {0,1}, {2,3}, ... mean-pooled) and the continuation is scored teacher-forced over the merged cache
(one forward of the continuation, which equals decoding it token by token: see the cached = uncached test).
Reported over the continuation tokens: perplexity ratio to the original model and top-1 agreement with it.

    .venv/bin/python benchmarks/dynamic_grouping.py --windows 16
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gqa.data import encode, load_text
from gqa.generation.dynamic import dynamic_prefill, options
from gqa.model.assets import shipped_model_path
from gqa.model.loading import load_model, load_model_tokenizer
from gqa.provenance import load_average, provenance, provenance_markdown

OUT = Path(__file__).parent / "results"


def score(model, prompt, cont, method, frac):
    """NLL sum, top-1 ids and seconds of clustering for one window; method 'original' / 'dynamic' / 'static'."""
    ids = torch.tensor([prompt])
    cont_ids = torch.tensor([cont])
    with torch.inference_mode():
        if method == "original":
            logits = model(torch.cat([ids, cont_ids], 1))[:, len(prompt) - 1 : -1]  # (1, C, vocab)
            return logits, 0.0
        hkv = model.layers[0].attn.n_kv_heads
        n = int(frac * hkv)
        fixed = None
        if method == "static":
            chunks = [tuple(c.tolist()) for c in torch.arange(hkv).tensor_split(n)]  # contiguous, sizes within 1
            fixed = [chunks for _ in model.layers]
        cache, first, _, cluster_s = dynamic_prefill(
            model, ids, torch.zeros(1, dtype=torch.long), len(prompt) + len(cont), options(kv_fraction=frac),
            fixed_clusters=fixed,
        )  # fmt: skip
        rest = model(cont_ids[:, :-1], cache=cache)  # (1, C - 1, vocab) over the merged cache
        return torch.cat([first, rest], 1), cluster_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--cont", type=int, default=96)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5])
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = load_average()
    path = shipped_model_path()
    model = load_model(path).eval()
    tok = load_model_tokenizer(path)
    ids = encode(tok, load_text("shakespeare:validation")).tolist()
    span = args.prompt + args.cont
    stride = max(span, (len(ids) - span) // args.windows)
    windows = [ids[i * stride : i * stride + span] for i in range(args.windows)]
    rows = []
    for frac in args.fractions:
        tot = {m: dict(nll=0.0, agree=0, n=0, cluster_s=0.0) for m in ("original", "dynamic", "static")}
        for w in windows:
            prompt, cont = w[: args.prompt], w[args.prompt :]
            target = torch.tensor(cont)
            ref = None
            for m in ("original", "dynamic", "static"):
                t0 = time.perf_counter()
                logits, cs = score(model, prompt, cont, m, frac)
                logits = logits[0].float()  # (C, vocab)
                top1 = logits.argmax(-1)
                if ref is None:
                    ref = top1
                r = tot[m]
                r["nll"] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                r["agree"] += int((top1 == ref).sum())
                r["n"] += len(cont)
                r["cluster_s"] += cs
                r.setdefault("wall_s", 0.0)
                r["wall_s"] += time.perf_counter() - t0
        base = math.exp(tot["original"]["nll"] / tot["original"]["n"])
        for m, r in tot.items():
            ppl = math.exp(r["nll"] / r["n"])
            rows.append(dict(kv_fraction=frac if m != "original" else 1.0, method=m, perplexity=ppl,
                             perplexity_ratio=ppl / base, top1_agreement=r["agree"] / r["n"], tokens=r["n"],
                             cluster_s_per_window=r["cluster_s"] / len(windows)))  # fmt: skip
    prov = provenance(dtype="float32", load_before=load_before, model=str(path.name), windows=args.windows,
                      prompt_tokens=args.prompt, continuation_tokens=args.cont, text="shakespeare:validation")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "dynamic-grouping.json").write_text(json.dumps(dict(provenance=prov, rows=rows), indent=2) + "\n")
    lines = [
        "# Dynamic vs static grouping at equal KV bytes (shipped Shakespeare MHA model, no training)",
        "",
        f"{args.windows} windows of held-out `shakespeare:validation`: {args.prompt} prompt tokens prefilled with "
        f"every head, then {args.cont} continuation tokens scored over the merged cache. Dynamic: heads clustered "
        "per layer on each prompt (K and V merged per cluster). Static: contiguous heads mean-pooled (chunks as equal as possible when the count does not divide 8). "
        "Top-1 agreement is with the original model on the continuation.",
        "",
        "| KV fraction | method | perplexity | ratio to original | top-1 agreement | clustering s / window |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kv_fraction']:.3g} | {r['method']} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} "
                     f"| {r['top1_agreement']:.3f} | {r['cluster_s_per_window']:.4f} |")  # fmt: skip
    lines += ["", "## Provenance", "", provenance_markdown(prov), ""]
    (OUT / "dynamic-grouping.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
