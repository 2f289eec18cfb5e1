"""Decode step time of a latent KV cache against GQA at equal KV bytes, SmolLM2-135M's shape, on this machine.

The models have SmolLM2-135M's shape (30 layers, 9 query heads of 64, d_model 576) and random weights (speed
does not depend on the values); each cache is filled with random entries up to ``--context`` tokens, so a
step is exactly what decoding at that context costs: the model's forward on one new token per sequence.
Variants at the same cache values per token and layer:

* ``gqa-3kv`` (the original: 384 values), ``gqa-1kv`` (128 values: 2 x 64);
* ``latent-R-r`` (R + 3 r values: each KV group keeps r rotated dims; 80 + 3 x 16 = 128);
* ``latent-R-r-shared`` (R + r values: one rotated key head for all heads, DeepSeek-V2's layout; 96 + 32 = 128).

``--shape gemma3``: Gemma-3-270M's shape instead (18 layers, 4 query heads and 1 KV head of 256, QK-norm, 5
sliding layers of 512 tokens to 1 global, vocabulary 262,144): ``gqa-1kv`` is the original (512 values),
``latent-R-r`` keeps the QK-norm (R + r + 4 values: each query head's key scale), sliding layers in rings.

Steps are timed interleaved (one step of each variant in turn, ``--repeats`` rounds, median and spread).
Results: ``benchmarks/results/latent-decode.md`` / ``.json`` with provenance.

    python benchmarks/latent_decode.py --context 8192 --batch 4 --threads 2
    python benchmarks/latent_decode.py --shape gemma3 --variants gqa-1kv,latent-92-32,latent-44-16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
SMOLLM2 = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, ffn_dim=1536, rope_theta=100000.0,
               tie_embeddings=True, max_seq_len=16384)  # fmt: skip
GEMMA3 = dict(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, head_dim=256, ffn_dim=2048, rope_theta=1e6,
              rope_local_theta=1e4, sliding_window=512, layer_types=(["sliding"] * 5 + ["global"]) * 3, qk_norm=True,
              hidden_act="gelu_tanh", sandwich_norm=True, embed_scale=640**0.5, norm_scale_fp32=True,
              attn_scale=256**-0.5, norm_eps=1e-6, tie_embeddings=True, max_seq_len=32768)  # fmt: skip
SHAPES = {"smollm2": SMOLLM2, "gemma3": GEMMA3}


def build(name: str, context: int, batch: int, dtype: torch.dtype, shape: str = "smollm2"):
    """(model, cache filled to ``context`` tokens) for a variant name."""
    from gqa.model import GQAConfig, GQAForCausalLM

    base = SHAPES[shape]
    if name.startswith("gqa-"):
        cfg = GQAConfig(**base, n_kv_heads=int(name[4:-2]))
    else:
        _, rank, rope, *shared = name.split("-")
        groups = 1 if shared == ["shared"] or shape == "gemma3" else 3
        cfg = GQAConfig(**base, n_kv_heads=groups, latent_rank=int(rank), latent_rope_dim=int(rope))
    model = GQAForCausalLM(cfg).to(dtype).eval()
    cache = model.make_cache(batch, context + 1)
    for layer in cache.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                t.normal_()
        layer.length = context
    return model, cache


@torch.no_grad()
def step(model, cache, context: int, batch: int) -> float:
    """Seconds for one decode step at ``context`` (the cache is rewound after it)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1))
    t0 = time.perf_counter()
    model(ids, cache=cache, logits_to_keep=1)
    dt = time.perf_counter() - t0
    for layer in cache.layers:
        layer.length = context
    return dt


def main() -> None:
    from gqa.provenance import load_average, provenance, provenance_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--variants", default="gqa-3kv,gqa-1kv,latent-80-16,latent-96-32-shared")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="the model shape (module doc)")
    args = ap.parse_args()
    load_before = load_average()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    names = args.variants.split(",")
    built = {n: build(n, args.context, args.batch, dtype, args.shape) for n in names}
    for n in names:  # warm up
        step(*built[n], args.context, args.batch)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            times[n].append(step(*built[n], args.context, args.batch))
    rows = []
    for n in names:
        model, cache = built[n]
        med = statistics.median(times[n])
        rows.append({
            "variant": n,
            "values_per_token_layer": sum(model.config.kv_values_per_token()) / model.config.n_layers,
            "kv_bytes_per_sequence": model.config.kv_bytes(args.context, dtype),
            "kv_bytes_held": cache.nbytes,
            "step_ms_median": round(1e3 * med, 2),
            "step_ms_min": round(1e3 * min(times[n]), 2),
            "step_ms_max": round(1e3 * max(times[n]), 2),
            "tok_per_s": round(args.batch / med, 2),
        })  # fmt: skip
    ref = next((r for r in rows if r["variant"] == "gqa-1kv"), rows[0])
    for r in rows:
        r["speed_vs_gqa_1kv"] = round(r["tok_per_s"] / ref["tok_per_s"], 3)
    prov = provenance(dtype=args.dtype, load_before=load_before, context=args.context, batch=args.batch)
    OUT.mkdir(parents=True, exist_ok=True)
    prefix = "latent-decode" if args.shape == "smollm2" else f"latent-decode-{args.shape}"
    stem = OUT / f"{prefix}-{args.dtype}-ctx{args.context}-b{args.batch}"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "provenance": prov}, indent=1) + "\n")
    lines = [
        f"# Decode step at {args.context:,} context, batch {args.batch}: latent cache vs GQA ({args.dtype}, {args.threads} threads)",
        "",
        f"{'SmolLM2-135M' if args.shape == 'smollm2' else 'Gemma-3-270M'}'s shape with random weights; caches filled to the context "
        "(sliding layers: their window); one new token per sequence per step,",
        f"variants interleaved, {args.repeats} rounds. Written by `benchmarks/latent_decode.py`.",
        "",
        "| variant | values / token / layer | KV bytes / sequence | cache bytes held | step ms (median) | min | max | tok/s | vs gqa-1kv |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['values_per_token_layer']:.0f} | {r['kv_bytes_per_sequence']:,} | {r['kv_bytes_held']:,} | {r['step_ms_median']} | "
            f"{r['step_ms_min']} | {r['step_ms_max']} | {r['tok_per_s']} | {r['speed_vs_gqa_1kv']} |"
        )
    lines += ["", "## Provenance", "", provenance_markdown(prov)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[5:5 + 2 + len(rows)]))


if __name__ == "__main__":
    main()
