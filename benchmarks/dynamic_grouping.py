"""Dynamic grouping (issue 25) against static contiguous grouping at the same KV bytes, no training.

On the shipped Shakespeare MHA model (8 heads) and held-out text (``shakespeare:validation``), each window
is a prompt of ``--prompt`` tokens then ``--cont`` continuation tokens. The prompt is prefilled with every
head; the cache is then merged (dynamic: clustered on this prompt, :mod:`gqa.generation.dynamic`; static:
heads {0,1}, {2,3}, ... mean-pooled) and the continuation is scored teacher-forced over the merged cache
(one forward of the continuation, which equals decoding it token by token: see the cached = uncached test).
Reported over the continuation tokens: perplexity ratio to the original model and top-1 agreement with it.

    .venv/bin/python benchmarks/dynamic_grouping.py --windows 16

Further sections (``--section``), each appended to the same results (the other sections' rows are kept):

* ``cost``: SmolLM2-135M, one 2048-token prompt of ``english:eval``: the clustering step's time against the
  plain prefill's, interleaved repeats (min), per option set;
* ``decode``: SmolLM2 decode tokens/s at a 2048-token context, dynamic (different map per layer) against
  static grouping at equal KV bytes (per-layer KV heads 3, 1, 3, 1, ...: 2/3 of the bytes, the model's own
  static cache), interleaved repeats;
* ``convert``: the calibrated static per-layer budget (``gqa convert --kv-budget F --calib english:calib``,
  no end-to-end training) written to ``--work`` for the ``smollm2`` section;
* ``smollm2``: perplexity ratio and top-1 agreement on held-out ``english:eval`` windows, dynamic vs static
  contiguous vs the calibrated per-layer budget at ``--fractions``;
* ``plot``: perplexity ratio against the KV fraction per method (PNG) from the rows recorded.

    .venv/bin/python benchmarks/dynamic_grouping.py --section cost
    .venv/bin/python benchmarks/dynamic_grouping.py --section convert --fractions 0.5
    .venv/bin/python benchmarks/dynamic_grouping.py --section smollm2 --fractions 0.5 --windows 16
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
    ap.add_argument("--section", default="shakespeare", choices=["shakespeare", *SECTIONS])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gqa-dynamic-grouping"), help="converted models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distill", default="none", choices=["none", "local"])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.section != "shakespeare":
        SECTIONS[args.section](args)
        return
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
    data = _load()
    data.update(provenance=prov, rows=rows)
    _save(data)


def _shakespeare_markdown(data) -> list[str]:
    prov, rows = data["provenance"], data["rows"]
    args = argparse.Namespace(windows=prov["windows"], prompt=prov["prompt_tokens"], cont=prov["continuation_tokens"])
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
    return lines


# --- further sections: SmolLM2 (cost, decode, the calibrated budget, quality) and the plot -----------------

JSON = OUT / "dynamic-grouping.json"
CONTEXT = 2048


def _load() -> dict:
    return json.loads(JSON.read_text()) if JSON.is_file() else {"sections": {}}


def _save(data: dict) -> None:
    """Write the JSON and the markdown of every section recorded (the Shakespeare rows first)."""
    data.setdefault("sections", {})
    OUT.mkdir(exist_ok=True)
    JSON.write_text(json.dumps(data, indent=2) + "\n")
    lines = _shakespeare_markdown(data) if "rows" in data else []
    for name in ("cost", "decode", "convert", "smollm2"):
        if name in data["sections"]:
            lines += MARKDOWN[name](data["sections"][name]) + ["", "Provenance:", "",
                                                                provenance_markdown(data["sections"][name]["provenance"]), ""]  # fmt: skip
    if (OUT / "dynamic-grouping.png").is_file():
        lines += ["![perplexity ratio against KV fraction](dynamic-grouping.png)", ""]
    (OUT / "dynamic-grouping.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _smollm2():
    from gqa.model import smollm2_gguf_path

    src = smollm2_gguf_path()
    t0 = time.perf_counter()
    model = load_model(src, dtype=torch.float32).eval()
    print(f"loaded {src.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return src, model, load_model_tokenizer(src)


def _eval_ids(tok):
    return encode(tok, load_text("english:eval"))


def _contiguous(hkv: int, n: int) -> list[tuple[int, ...]]:
    return [tuple(c.tolist()) for c in torch.arange(hkv).tensor_split(n)]  # contiguous chunks, sizes within 1


def _static_counts(model, frac: float) -> list[int]:
    """Static contiguous cluster counts per layer at ``frac`` of the KV bytes: uniform where floor(frac x Hkv)
    reaches the target, else alternating floor / ceil over the layers (e.g. SmolLM2 at 1/2: 2, 1, 2, 1, ...)."""
    hkv = model.config.kv_heads_per_layer
    budget = math.floor(frac * sum(hkv) + 1e-9)
    counts = [max(1, math.floor(frac * h + 1e-9)) for h in hkv]
    for i in range(len(counts)):
        if sum(counts) >= budget:
            break
        if i % 2 == 0 and counts[i] < hkv[i]:
            counts[i] += 1
    return counts


# cost ----------------------------------------------------------------------------------------------------

COST_VARIANTS = {  # label -> options
    "uniform 2/3, 64 query rows": dict(kv_fraction=2 / 3),
    "measured 1/2, 64 query rows": dict(kv_fraction=0.5, allocation="measured"),
    "uniform 2/3, 16 query rows": dict(kv_fraction=2 / 3, query_rows=16),
    "measured 1/2, 16 query rows": dict(kv_fraction=0.5, allocation="measured", query_rows=16),
}


def section_cost(args):
    load_before = load_average()
    src, model, tok = _smollm2()
    ids = _eval_ids(tok)[:CONTEXT][None]  # (1, 2048)
    pad = torch.zeros(1, dtype=torch.long)
    times = {"prefill": []} | {k: [] for k in COST_VARIANTS}
    with torch.inference_mode():
        for rep in range(args.repeats):  # interleaved: every variant sees the same load
            t0 = time.perf_counter()
            model(ids, cache=model.make_cache(1, CONTEXT), logits_to_keep=1)
            times["prefill"].append(time.perf_counter() - t0)
            for label, kw in COST_VARIANTS.items():
                _, _, _, cluster_s = dynamic_prefill(model, ids, pad, CONTEXT + 1, options(**kw))
                times[label].append(cluster_s)
            print(rep, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    prefill = min(times["prefill"])
    rows = [dict(variant=k, cluster_s=min(v), prefill_s=prefill, fraction_of_prefill=min(v) / prefill,
                 all_s=[round(x, 4) for x in v]) for k, v in times.items() if k != "prefill"]  # fmt: skip
    prov = provenance(dtype="float32", load_before=load_before, model=src.name, prompt_tokens=CONTEXT,
                      repeats=args.repeats, prefill_all_s=[round(x, 4) for x in times["prefill"]])  # fmt: skip
    data = _load()
    data["sections"]["cost"] = dict(provenance=prov, rows=rows)
    _save(data)


def _cost_md(sec) -> list[str]:
    prefill = sec["rows"][0]["prefill_s"]
    lines = ["## Clustering cost at a 2048-token prompt (SmolLM2-135M, CPU, 1 thread)", "",
             f"Plain prefill (every head, static cache): {prefill:.2f} s (min of {sec['provenance']['repeats']} "
             "interleaved repeats). Clustering = the step after that prefill (distances, merges, measured errors, "
             "the merged cache build), min over the same repeats. Goal: at most 5% of the prefill.", "",
             "| options | clustering s | share of prefill | goal met |", "|---|---|---|---|"]  # fmt: skip
    for r in sec["rows"]:
        lines.append(f"| {r['variant']} | {r['cluster_s']:.3f} | {100 * r['fraction_of_prefill']:.1f}% "
                     f"| {'yes' if r['fraction_of_prefill'] <= 0.05 else 'no'} |")  # fmt: skip
    return lines


# decode --------------------------------------------------------------------------------------------------


def _pooled(model, counts):
    """A static GQA model with ``counts[i]`` KV heads in layer i: contiguous K/V projections mean-pooled (a
    standard per-layer-heads model for timing; quality is measured elsewhere)."""
    import dataclasses

    from gqa.model import GQAForCausalLM

    cfg = dataclasses.replace(model.config, n_kv_heads=list(counts))
    out = GQAForCausalLM(cfg).eval()
    state = model.state_dict()
    for i, (layer, n) in enumerate(zip(model.layers, counts, strict=True)):
        d, hkv = layer.attn.head_dim, layer.attn.n_kv_heads
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{name}.weight"].view(hkv, d, -1)  # (Hkv, D, d_model)
            state[f"layers.{i}.attn.{name}.weight"] = w.view(n, hkv // n, d, -1).mean(1).reshape(n * d, -1)
    out.load_state_dict(state)
    return out


def _time_decode(model, cache, first, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps over ``cache`` (which is rewound afterwards)."""
    lengths = [layer.length for layer in cache.layers]
    nxt = first
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    dt = time.perf_counter() - t0
    for layer, n in zip(cache.layers, lengths, strict=True):
        layer.length = n
    return dt


def section_decode(args):
    load_before = load_average()
    src, model, tok = _smollm2()
    ids = _eval_ids(tok)[:CONTEXT][None]
    steps = 32
    pad = torch.zeros(1, dtype=torch.long)
    counts = [3 if i % 2 == 0 else 1 for i in range(len(model.layers))]  # 60 of 90 heads: 2/3 of the bytes
    static_model = _pooled(model, counts)
    caches = {}
    with torch.inference_mode():
        for label, kw in [("dynamic uniform 2/3 (2 clusters per layer)", dict(kv_fraction=2 / 3)),
                          ("dynamic measured 2/3", dict(kv_fraction=2 / 3, allocation="measured"))]:  # fmt: skip
            cache, logits, groupings, _ = dynamic_prefill(model, ids, pad, CONTEXT + steps + 1, options(**kw))
            slots = sum(g.slots for g in groupings[0])
            caches[label] = (model, cache, logits[:, -1].argmax(-1, keepdim=True), slots)
        c = static_model.make_cache(1, CONTEXT + steps + 1)
        logits = static_model(ids, cache=c, logits_to_keep=1)
        caches["static per-layer heads 3,1,3,1,... (2/3)"] = (static_model, c, logits[:, -1].argmax(-1, keepdim=True),
                                                             2 * sum(counts))  # fmt: skip
        c = model.make_cache(1, CONTEXT + steps + 1)
        logits = model(ids, cache=c, logits_to_keep=1)
        caches["original (3 KV heads)"] = (model, c, logits[:, -1].argmax(-1, keepdim=True), 2 * 3 * len(counts))
        times = {k: [] for k in caches}
        for rep in range(args.repeats):
            for label, (m, cache, first, _) in caches.items():
                times[label].append(_time_decode(m, cache, first, steps))
            print(rep, {k: round(steps / v[-1], 1) for k, v in times.items()}, flush=True)
    full = 2 * 3 * len(counts)
    rows = [dict(method=k, kv_fraction_held=caches[k][3] / full, tokens_per_s=steps / min(v),
                 all_tokens_per_s=[round(steps / x, 2) for x in v]) for k, v in times.items()]  # fmt: skip
    prov = provenance(dtype="float32", load_before=load_before, model=src.name, context=CONTEXT, steps=steps,
                      repeats=args.repeats)  # fmt: skip
    data = _load()
    data["sections"]["decode"] = dict(provenance=prov, rows=rows)
    _save(data)


def _decode_md(sec) -> list[str]:
    p = sec["provenance"]
    static = next(r for r in sec["rows"] if r["method"].startswith("static"))
    lines = ["## Decode tokens/s at equal KV bytes (SmolLM2-135M, 2048-token context, CPU, 1 thread, batch 1)", "",
             f"{p['steps']} greedy decode steps after a {p['context']}-token `english:eval` prompt, best of "
             f"{p['repeats']} interleaved repeats. Dynamic: the merged cache with a different head map per layer "
             "(query heads stacked by slot, the ordinary GQA kernel). Static: a model with 3, 1, 3, 1, ... KV heads "
             "(the same bytes) and its own static cache. Goal: dynamic within 10% of static.", "",
             "| method | KV fraction held | tokens/s | vs static | goal met |", "|---|---|---|---|---|"]  # fmt: skip
    for r in sec["rows"]:
        rel = r["tokens_per_s"] / static["tokens_per_s"]
        goal = "-" if not r["method"].startswith("dynamic") else ("yes" if rel >= 0.9 else "no")
        lines.append(f"| {r['method']} | {r['kv_fraction_held']:.3f} | {r['tokens_per_s']:.1f} | {rel:.3f} | {goal} |")
    return lines


# convert: the calibrated static per-layer budget -------------------------------------------------------


def _budget_dir(args, frac: float) -> Path:
    return args.work / f"budget-{frac:.3f}-{args.distill}-{args.calib_tokens}"


def section_convert(args):
    from gqa.convert import convert
    from gqa.model import smollm2_gguf_path

    load_before = load_average()
    data = _load()
    rows = data["sections"].get("convert", {}).get("rows", [])
    for frac in args.fractions:
        out = _budget_dir(args, frac)
        t0 = time.perf_counter()
        report = convert(smollm2_gguf_path(), out, kv_budget=frac, calib="english:calib", calib_tokens=args.calib_tokens,
                         distill=args.distill, progress=False, force=True)  # fmt: skip
        del report
        heads = list(load_model(out, dtype=torch.float32).config.kv_heads_per_layer)
        row = dict(kv_fraction=frac, distill=args.distill, calib_tokens=args.calib_tokens,
                   seconds=time.perf_counter() - t0, folder=out.name, kv_heads=heads,
                   kv_fraction_held=sum(heads) / (3 * len(heads)))  # fmt: skip
        rows = [r for r in rows if (r["kv_fraction"], r["distill"]) != (frac, args.distill)] + [row]
        print(row, flush=True)
    data["sections"]["convert"] = dict(provenance=provenance(load_before=load_before, dtype="float32"), rows=rows)
    _save(data)


def _convert_md(sec) -> list[str]:
    lines = ["## The calibrated static per-layer budget (SmolLM2-135M, `gqa convert --kv-budget F --calib english:calib`)",
             "", "No end-to-end training; per-layer KV heads chosen by the budget's dynamic program.", "",
             "| KV fraction asked | local distillation | calibration tokens | seconds | KV heads per layer |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in sec["rows"]:
        lines.append(f"| {r['kv_fraction']:.3g} | {r['distill']} | {r['calib_tokens']} | {r['seconds']:.0f} "
                     f"| {r['kv_heads']} |")  # fmt: skip
    return lines


# smollm2 quality ---------------------------------------------------------------------------------------


def _continuation_logits(model, prompt, cont, opts=None, fixed=None):
    """Logits ``[C, vocab]`` predicting ``cont``: over the merged cache (opts / fixed clusters) or, with neither,
    one forward of the whole window. Returns (logits, KV slots held per token or None)."""
    ids, cont_ids = torch.tensor([prompt]), torch.tensor([cont])
    if opts is None:
        return model(torch.cat([ids, cont_ids], 1))[0, len(prompt) - 1 : -1].float(), None
    cache, first, groupings, _ = dynamic_prefill(model, ids, torch.zeros(1, dtype=torch.long),
                                                 len(prompt) + len(cont), opts, fixed_clusters=fixed)  # fmt: skip
    rest = model(cont_ids[:, :-1], cache=cache)  # (1, C - 1, vocab) over the merged cache
    return torch.cat([first, rest], 1)[0].float(), sum(g.slots for g in groupings[0])


def section_smollm2(args):
    load_before = load_average()
    src, model, tok = _smollm2()
    ids = _eval_ids(tok).tolist()
    span = args.prompt + args.cont
    stride = max(span, (len(ids) - span) // args.windows)
    windows = [ids[i * stride : i * stride + span] for i in range(args.windows)]
    hkv = model.config.kv_heads_per_layer
    full_slots = 2 * sum(hkv)
    data = _load()
    old = data["sections"].get("smollm2", {})
    rows = [r for r in old.get("rows", []) if r["kv_fraction"] not in args.fractions]
    for frac in args.fractions:
        methods = {"dynamic measured": (options(kv_fraction=frac, allocation="measured"), None),
                   "dynamic measured, 16 query rows": (options(kv_fraction=frac, allocation="measured", query_rows=16), None)}  # fmt: skip
        if 2 * sum(math.floor(frac * h + 1e-9) for h in hkv) >= math.floor(frac * full_slots + 1e-9):  # uniform reaches it
            methods["dynamic uniform"] = (options(kv_fraction=frac), None)
            if frac > 0.5:
                methods["dynamic uniform, V kept (CHAI)"] = (options(kv_fraction=frac, values="keep"), None)
        counts = _static_counts(model, frac)
        methods["static contiguous"] = (options(kv_fraction=frac), [_contiguous(h, n) for h, n in zip(hkv, counts, strict=True)])
        budget = _budget_dir(args, frac)
        budget_model = load_model(budget, dtype=torch.float32).eval() if (budget / "config.json").is_file() else None
        if budget_model is None:
            print(f"no calibrated budget at {budget}: run --section convert --fractions {frac} first", flush=True)
        tot = {m: dict(nll=0.0, agree=0, n=0, slots=0) for m in ["original", *methods, "static per-layer budget"]}
        t_start = time.perf_counter()
        with torch.inference_mode():
            for wi, w in enumerate(windows):
                prompt, cont = w[: args.prompt], w[args.prompt :]
                target = torch.tensor(cont)
                ref = None
                for m in tot:
                    if m == "original":
                        logits, slots = _continuation_logits(model, prompt, cont)
                        slots = full_slots
                    elif m == "static per-layer budget":
                        if budget_model is None:
                            continue
                        logits, _ = _continuation_logits(budget_model, prompt, cont)
                        slots = 2 * sum(budget_model.config.kv_heads_per_layer)
                    else:
                        logits, slots = _continuation_logits(model, prompt, cont, *methods[m])
                    top1 = logits.argmax(-1)
                    ref = top1 if ref is None else ref
                    r = tot[m]
                    r["nll"] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                    r["agree"] += int((top1 == ref).sum())
                    r["n"] += len(cont)
                    r["slots"] += slots
                print(f"fraction {frac:.3g}: window {wi + 1}/{len(windows)} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        base = math.exp(tot["original"]["nll"] / tot["original"]["n"])
        for m, r in tot.items():
            if not r["n"]:
                continue
            ppl = math.exp(r["nll"] / r["n"])
            rows.append(dict(kv_fraction=frac, method=m, perplexity=ppl, perplexity_ratio=ppl / base,
                             top1_agreement=r["agree"] / r["n"], tokens=r["n"],
                             kv_fraction_held=r["slots"] / len(windows) / full_slots))  # fmt: skip
    prov = provenance(dtype="float32", load_before=load_before, model=src.name, windows=args.windows,
                      prompt_tokens=args.prompt, continuation_tokens=args.cont, text="english:eval",
                      budget=f"{args.distill} distillation, {args.calib_tokens} calibration tokens of english:calib")  # fmt: skip
    provs = old.get("provenance_by_fraction", {})
    for frac in args.fractions:
        provs[f"{frac:.3f}"] = prov
    data["sections"]["smollm2"] = dict(provenance=prov, provenance_by_fraction=provs, rows=rows)
    _save(data)


def _smollm2_md(sec) -> list[str]:
    p = sec["provenance"]
    lines = ["## SmolLM2-135M on held-out English: dynamic vs static contiguous vs the calibrated per-layer budget", "",
             f"{p['windows']} windows of `english:eval`: {p['prompt_tokens']} prompt tokens, then "
             f"{p['continuation_tokens']} continuation tokens scored (perplexity ratio to the original, top-1 agreement "
             "with it). Dynamic and static contiguous prefill the prompt with every head and merge the cache after it "
             "(static contiguous: chunks of neighbouring heads mean-pooled, uniform counts or alternating floor/ceil "
             "per layer when the fraction does not give whole heads); dynamic measured spreads the bytes over the "
             "layers per prompt by the error each layer's merge adds to the residual stream on the prompt. The per-layer budget model (`gqa convert --kv-budget`, similarity grouping, aligned "
             f"fit merges; {p['budget']}; no end-to-end training) runs its own heads on the whole window. KV fraction held: "
             "K+V slots held per token over the original's, mean over windows.", "",
             "| KV fraction | method | KV fraction held | perplexity | ratio to original | top-1 agreement |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(sec["rows"], key=lambda r: (r["kv_fraction"], r["method"] != "original")):
        lines.append(f"| {r['kv_fraction']:.3g} | {r['method']} | {r['kv_fraction_held']:.3f} | {r['perplexity']:.3f} "
                     f"| {r['perplexity_ratio']:.3f} | {r['top1_agreement']:.3f} |")  # fmt: skip
    return lines


# plot --------------------------------------------------------------------------------------------------


def section_plot(args):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = _load()
    panels = [("shipped Shakespeare MHA model", [r for r in data.get("rows", [])]),
              ("SmolLM2-135M, english:eval", data["sections"].get("smollm2", {}).get("rows", []))]  # fmt: skip
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for i, (title, rows) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        methods = sorted({r["method"] for r in rows if r["method"] != "original"})
        for m in methods:
            pts = sorted((r.get("kv_fraction_held", r["kv_fraction"]), r["perplexity_ratio"]) for r in rows if r["method"] == m)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("KV bytes held / original")
        ax.set_ylabel("perplexity ratio to original")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "dynamic-grouping.png", dpi=120)
    _save(data)


SECTIONS = {"cost": section_cost, "decode": section_decode, "convert": section_convert, "smollm2": section_smollm2,
            "plot": section_plot}  # fmt: skip
MARKDOWN = {"cost": _cost_md, "decode": _decode_md, "convert": _convert_md, "smollm2": _smollm2_md}


if __name__ == "__main__":
    main()

