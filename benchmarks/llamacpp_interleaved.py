"""gqa against llama.cpp on the same CPU, the same GGUF weights and in one run: decode and prefill tokens/s,
point by point, the two engines alternating within every point.

    python benchmarks/llamacpp_interleaved.py --bin LLAMA_CPP_BIN --model kv3=A.gguf --model kv1=B.gguf \\
        [--dtypes float32,bfloat16] [--threads 1,2] [--contexts 512,2048,8192] [--batches 1,4,16] \\
        [--repeats 5] [--new-tokens 16] [--out benchmarks/results/llamacpp-interleaved-cpu]

Each ``--model NAME=FILE.gguf`` is a float32 GGUF written by ``gqa convert ... --export gguf --dtype float32``
(``NAME=F32FILE,BF16FILE`` gives the bfloat16 file too; without it bfloat16 points are skipped for that
model). llama.cpp (``llama-batched-bench``, built by benchmarks/llamacpp_peer.sh) is a peer, never a
dependency.

A point is (model, dtype, threads, context, batch). Per repeat both engines run once, in alternating order:

* **llama.cpp**: ``llama-batched-bench -npp CONTEXT -ntg N -npl BATCH -pps`` (the prompt prefilled once and
  shared by the batch), KV cache f32 for float32 weights and f16 for bfloat16 ones, pinned with ``taskset``
  to the first THREADS cores and ``-t/-tb THREADS``.
* **gqa**: the same file loaded by gqa (weights in that dtype, KV cache in that dtype), pinned to the same
  cores with ``torch.set_num_threads``: one sequence of CONTEXT random tokens prefilled into the static
  cache, its K/V copied to BATCH slots, one untimed warm-up step, then N timed greedy decode steps
  (``model(next, cache, logits_to_keep=1)``, what ``gqa.generate`` runs).

Decode tok/s = BATCH x N / the decode time (both engines); prefill tok/s = CONTEXT / the prefill time. Every
point records the median and the spread (min..max) over the repeats, and the load average before and after
it. The estimated run time is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KV_TYPE = {"float32": "f32", "bfloat16": "f16"}  # llama.cpp's KV cache type per weight dtype


def llama_cpp_point(binary: Path, gguf: Path, dtype: str, threads: int, context: int, batch: int, n: int) -> dict:
    """One llama-batched-bench run: decode and prefill tok/s."""
    cmd = [
        "taskset", "-c", f"0-{threads - 1}", str(binary / "llama-batched-bench"), "-m", str(gguf),
        "-c", str(context + batch * n + 64), "-b", "2048", "-ub", "512", "-npp", str(context), "-ntg", str(n),
        "-npl", str(batch), "-pps", "-kvu", "-t", str(threads), "-tb", str(threads),
        "-ctk", KV_TYPE[dtype], "-ctv", KV_TYPE[dtype], "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=True).stdout
    row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"decode_tok_s": row["speed_tg"], "prefill_tok_s": row["speed_pp"]}


@torch.no_grad()
def gqa_point(model, threads: int, context: int, batch: int, n: int, seed: int) -> dict:
    """One gqa run (see the module doc): decode and prefill tok/s."""
    torch.set_num_threads(threads)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    dtype = next(model.parameters()).dtype
    one = model.make_cache(1, context + n + 1, dtype=dtype)
    t0 = time.perf_counter()
    logits = model(ids, cache=one, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    cache = model.make_cache(batch, context + n + 1, dtype=dtype)
    for src, dst in zip(one.layers, cache.layers, strict=True):
        dst.k[:, :, :context] = src.k[:, :, :context]
        dst.v[:, :, :context] = src.v[:, :, :context]
        dst.length = context
    nxt = logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1).contiguous()
    nxt = model(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # warm-up step, untimed
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = model(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t0
    return {"decode_tok_s": batch * n / decode_s, "prefill_tok_s": context / prefill_s}


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def _pin(threads: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(threads)))


def run_point(binary, gguf, model, dtype, threads, context, batch, n, repeats) -> dict:
    """Both engines ``repeats`` times, alternating which goes first."""
    load_before = list(os.getloadavg())
    runs = {"gqa": [], "llama.cpp": []}
    _pin(threads)
    for r in range(repeats):
        order = ("gqa", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "gqa")
        for engine in order:
            if engine == "gqa":
                runs[engine].append(gqa_point(model, threads, context, batch, n, seed=r))
            else:
                runs[engine].append(llama_cpp_point(binary, gguf, dtype, threads, context, batch, n))
    _pin(os.cpu_count() or 1)
    out = {"load_before": load_before, "load_after": list(os.getloadavg())}
    for engine, rs in runs.items():
        out[engine] = {k: _summary([x[k] for x in rs]) for k in ("decode_tok_s", "prefill_tok_s")}
    out["decode_ratio"] = out["gqa"]["decode_tok_s"]["median"] / out["llama.cpp"]["decode_tok_s"]["median"]
    out["prefill_ratio"] = out["gqa"]["prefill_tok_s"]["median"] / out["llama.cpp"]["prefill_tok_s"]["median"]
    return out


def estimate_seconds(points: list[tuple], repeats: int, n: int) -> float:
    """A rough run time: prefill at ~600 tok/s x threads, decode at ~25 steps/s per engine, plus load."""
    total = 0.0
    for _, _, threads, context, batch in points:
        prefill = context / (600 * threads)
        decode = n * (0.04 + 0.004 * batch * context / 2048) / threads
        total += repeats * 2 * (prefill + decode + 0.7)
    return total


def parse_models(specs: list[str]) -> dict[str, dict[str, Path]]:
    models = {}
    for spec in specs:
        name, _, files = spec.partition("=")
        paths = [Path(p) for p in files.split(",") if p]
        if not name or not paths or any(not p.is_file() for p in paths):
            raise SystemExit(f"--model {spec!r}: give NAME=F32.gguf[,BF16.gguf] with existing files")
        models[name] = {"float32": paths[0], **({"bfloat16": paths[1]} if len(paths) > 1 else {})}
    return models


def main() -> None:
    from gqa.model import load_model
    from gqa.provenance import load_average, provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="folder holding llama-batched-bench")
    ap.add_argument("--model", action="append", required=True, help="NAME=F32.gguf[,BF16.gguf]")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llamacpp-interleaved-cpu")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    models = parse_models(args.model)
    points = [
        (name, dtype, t, c, b)
        for name, files in models.items()
        for dtype in args.dtypes.split(",")
        if dtype in files
        for t in ints(args.threads)
        for c in ints(args.contexts)
        for b in ints(args.batches)
    ]
    est = estimate_seconds(points, args.repeats, args.new_tokens)
    print(f"{len(points)} points x {args.repeats} repeats x 2 engines: about {est / 60:.0f} minutes", file=sys.stderr)
    load_before = load_average()
    rows, loaded = [], {}
    t_start = time.perf_counter()
    for i, (name, dtype, t, c, b) in enumerate(points):
        key = (name, dtype)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[key] = load_model(models[name][dtype], dtype=getattr(torch, dtype)).eval()
        res = run_point(args.bin, models[name][dtype], loaded[key], dtype, t, c, b, args.new_tokens, args.repeats)
        rows.append({"model": name, "file": models[name][dtype].name, "dtype": dtype, "llama_cpp_kv": KV_TYPE[dtype],
                     "threads": t, "context": c, "batch": b, **res})  # fmt: skip
        done = time.perf_counter() - t_start
        print(f"[{i + 1}/{len(points)}] {name} {dtype} t={t} ctx={c} b={b}: decode gqa/llama.cpp x{res['decode_ratio']:.2f}, "
              f"prefill x{res['prefill_ratio']:.2f} ({done / 60:.1f} min, ETA {done / (i + 1) * (len(points) - i - 1) / 60:.1f} min)",
              file=sys.stderr)  # fmt: skip
        write(
            rows,
            args,
            provenance(dtype=args.dtypes, load_before=load_before, repeats=args.repeats, new_tokens=args.new_tokens),
        )


def write(rows: list[dict], args, prov: dict) -> None:
    from gqa.provenance import provenance_markdown

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "provenance": prov}, indent=1) + "\n")
    med = lambda r, e, k: r[e][k]["median"]  # noqa: E731
    spread = lambda r, e, k: f"{r[e][k]['min']:.0f}..{r[e][k]['max']:.0f}"  # noqa: E731
    met = sum(r["decode_ratio"] >= 1.0 for r in rows)
    lines = [
        "# gqa against llama.cpp on one CPU, one run, the same GGUF weights",
        "",
        f"Written by `benchmarks/llamacpp_interleaved.py` ({args.repeats} repeats per point, the engines alternating; "
        f"{args.new_tokens} decode steps). Goal: gqa decode >= 1.0x llama.cpp at every point: **{met}/{len(rows)}** points meet it.",
        "Decode tok/s = batch x steps / decode time; prefill tok/s = context / prefill time (one shared prompt in both).",
        "Median (min..max) over the repeats; load = 1-minute load average before -> after the point.",
        "",
        "| model | dtype (llama.cpp KV) | threads | context | batch | gqa decode | llama.cpp decode | decode ratio | gqa prefill | llama.cpp prefill | prefill ratio | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} ({r['llama_cpp_kv']}) | {r['threads']} | {r['context']} | {r['batch']} | "
            f"{med(r, 'gqa', 'decode_tok_s'):.1f} ({spread(r, 'gqa', 'decode_tok_s')}) | "
            f"{med(r, 'llama.cpp', 'decode_tok_s'):.1f} ({spread(r, 'llama.cpp', 'decode_tok_s')}) | **{r['decode_ratio']:.2f}x** | "
            f"{med(r, 'gqa', 'prefill_tok_s'):.0f} | {med(r, 'llama.cpp', 'prefill_tok_s'):.0f} | {r['prefill_ratio']:.2f}x | "
            f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} |"
        )
    lines += ["", "## Provenance", "", provenance_markdown(prov)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, out.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["dtype"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.8), squeeze=False)
    for ax, (dtype, threads) in zip(axes[0], combos, strict=True):
        for model in sorted({r["model"] for r in rows}):
            for batch in sorted({r["batch"] for r in rows}):
                sel = sorted((r for r in rows if (r["dtype"], r["threads"], r["model"], r["batch"]) == (dtype, threads, model, batch)),
                             key=lambda r: r["context"])  # fmt: skip
                if sel:
                    ax.plot(
                        [r["context"] for r in sel],
                        [r["decode_ratio"] for r in sel],
                        marker="o",
                        label=f"{model} b={batch}",
                    )
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype}, {threads} thread{'s' if threads > 1 else ''}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("gqa / llama.cpp decode tok/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
