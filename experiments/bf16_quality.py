"""bf16 on CPU: held-out perplexity of SmolLM2-135M with bf16 weights, activations and KV cache against fp32.

What ``gqa eval MODEL --dtype bfloat16`` computes, on the first 8,192 tokens of ``english:eval`` in windows of
256, with top-1 agreement and KL against the fp32 model. Writes ``docs/results/bf16-cpu-quality.md`` / ``.json``.

    python experiments/bf16_quality.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "bf16-cpu-quality"


def main() -> None:
    from gqa.data import load_text
    from gqa.data.tokenizer import encode
    from gqa.evaluate import evaluate_lm
    from gqa.model import load_model, load_model_tokenizer, smollm2_gguf_path
    from gqa.provenance import load_average, provenance, provenance_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    load_before = load_average()
    torch.set_num_threads(args.threads)
    src = smollm2_gguf_path()
    ids = encode(load_model_tokenizer(src), load_text("english:eval"))[: args.tokens]
    fp32 = load_model(src, dtype=torch.float32).eval()
    bf16 = load_model(src, dtype=torch.bfloat16).eval()
    t0 = time.perf_counter()
    r32 = evaluate_lm(fp32, ids, seq_len=256)
    t32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    r16 = evaluate_lm(bf16, ids, teacher=fp32, seq_len=256)
    t16 = time.perf_counter() - t0
    row = {
        "model": src.name,
        "tokens": r32.tokens,
        "perplexity_fp32": r32.perplexity,
        "perplexity_bf16": r16.perplexity,
        "ratio": r16.perplexity / r32.perplexity,
        "top1_agreement_bf16_vs_fp32": r16.top1_agreement,
        "kl_fp32_to_bf16": r16.kl,
        "seconds_fp32": round(t32, 1),
        "seconds_bf16_with_fp32_teacher": round(t16, 1),
        "provenance": provenance(dtype="bfloat16 vs float32", load_before=load_before),
    }
    OUT.with_suffix(".json").write_text(json.dumps(row, indent=1) + "\n")
    lines = [
        "# bf16 on CPU: SmolLM2-135M held-out perplexity, bf16 weights + activations + KV cache vs fp32",
        "",
        f"`english:eval`, first {r32.tokens:,} tokens, windows of 256 (what `gqa eval --dtype bfloat16` runs).",
        "",
        "| | perplexity | ratio to fp32 | top-1 agreement with fp32 | KL(fp32 \\|\\| bf16) nats/token |",
        "|---|---|---|---|---|",
        f"| float32 | {r32.perplexity:.4f} | 1 | 1 | 0 |",
        f"| bfloat16 | {r16.perplexity:.4f} | {row['ratio']:.5f} | {r16.top1_agreement:.4f} | {r16.kl:.5f} |",
        "",
        f"Goal (issue 24): within 0.5% of fp32 -> {'met' if abs(row['ratio'] - 1) <= 0.005 else 'not met'} "
        f"({(row['ratio'] - 1) * 100:+.2f}%). Written by `experiments/bf16_quality.py`.",
        "",
        "## Provenance",
        "",
        provenance_markdown(row["provenance"]),
    ]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:8]))


if __name__ == "__main__":
    main()
