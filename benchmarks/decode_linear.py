"""The decode GEMV (``gqa.kernels.cpu_step``) against torch's ``F.linear`` on a decode step's weight shapes.

    python benchmarks/decode_linear.py --out benchmarks/results

For each weight shape of SmolLM2-135M (and the fused shapes of one QKV and one gate/up matrix), each dtype
(fp32, bf16) and each row count (batch x new tokens: 1, 2, 4, 8, 16), the two are timed interleaved call by
call on weights that are not in cache: a set of copies larger than the last-level cache is cycled, as a
decode step reads its 30 layers' weights once each. Reported: median microseconds, weight bytes read per
second, the fraction of the read bandwidth measured in the same run, and the ratio torch / ours. The
thresholds in ``gqa.kernels.cpu_step.MAX_ROWS`` come from this table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: (name, out features, in features) of SmolLM2-135M (d_model 576, 9 q / 3 KV heads of 64, ffn 1536).
SHAPES = [
    ("q / o", 576, 576),
    ("k / v", 192, 576),
    ("qkv fused", 960, 576),
    ("gate / up", 1536, 576),
    ("gate+up fused", 3072, 576),
    ("down", 576, 1536),
    ("lm head", 49152, 576),
]
ROWS = (1, 2, 4, 8, 16)
COLD_BYTES = 256 * 2**20  # copies of each weight cycled per shape: more than any L3 of the CPUs measured


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_pair(x, weights, calls: int) -> tuple[float, float]:
    """Median seconds of torch's and the kernel's call, alternating call by call over cold weight copies."""
    from gqa.kernels import cpu_fused

    op, none = cpu_fused.linears_op(), torch.empty(0)
    torch_t, ours_t = [], []
    for i in range(calls + 3):
        w = weights[i % len(weights)]
        pair = ((lambda w=w: F.linear(x, w), torch_t), (lambda w=w: op(x, [w], [none]), ours_t))
        for fn, acc in pair[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # warm-up calls
                acc.append(time.perf_counter() - t0)
    return _median(torch_t), _median(ours_t)


def read_bandwidth() -> float:
    """GB/s of ``sum`` over 256 MiB of fp32 (read only)."""
    x = torch.randn(COLD_BYTES // 4)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / _median(times) / 1e9


def run(threads: int, calls: int) -> dict:
    from gqa.kernels import cpu_fused
    from gqa.provenance import load_average, provenance

    torch.set_num_threads(threads)
    if not cpu_fused.available():
        raise SystemExit(f"the kernel library did not build: {cpu_fused.status()}")
    load_before = load_average()
    bw_before = read_bandwidth()
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, n, k in SHAPES:
            nbytes = n * k * dtype.itemsize
            weights = [torch.randn(n, k).to(dtype) for _ in range(max(2, COLD_BYTES // nbytes))]
            for m in ROWS:
                x = torch.randn(m, k).to(dtype)
                t_torch, t_ours = time_pair(x, weights, calls)
                rows_out.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "shape": name,
                        "n": n,
                        "k": k,
                        "rows": m,
                        "torch_us": t_torch * 1e6,
                        "ours_us": t_ours * 1e6,
                        "torch_gbps": nbytes / t_torch / 1e9,
                        "ours_gbps": nbytes / t_ours / 1e9,
                        "ratio": t_torch / t_ours,
                    }
                )
                print(f"{rows_out[-1]['dtype']:8} {name:14} rows {m:2}: x{t_torch / t_ours:.2f}", flush=True)
            del weights
    bw = (bw_before + read_bandwidth()) / 2
    for r in rows_out:
        r["ours_of_bandwidth"] = r["ours_gbps"] / bw
    prov = provenance(dtype="float32,bfloat16", load_before=load_before, calls_per_point=calls)
    return {"provenance": prov, "read_gbps": bw, "rows": rows_out}


def write(res: dict, out: Path, name: str) -> None:
    from gqa.provenance import provenance_markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# The decode GEMV against torch's F.linear, one run, interleaved call by call",
        "",
        "Written by `benchmarks/decode_linear.py`. Cold weights (copies cycled past the last-level cache); median "
        f"of {res['provenance']['calls_per_point']} calls each. Read bandwidth measured in the same run (sum over "
        f"256 MiB): **{res['read_gbps']:.1f} GB/s**. ratio = torch time / ours (> 1: ours is faster).",
        "",
        "| dtype | shape | N x K | rows | torch us | ours us | torch GB/s | ours GB/s | ours / read bw | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['n']} x {r['k']} | {r['rows']} | {r['torch_us']:.0f} | "
            f"{r['ours_us']:.0f} | {r['torch_gbps']:.1f} | {r['ours_gbps']:.1f} | {r['ours_of_bandwidth']:.0%} | "
            f"**{r['ratio']:.2f}x** |"
        )
    lines += ["", "## Provenance", "", provenance_markdown(res["provenance"])]
    (out / f"{name}.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=41, help="timed calls per engine and point")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="decode-linear-cpu")
    args = ap.parse_args()
    print(f"estimate: about {len(SHAPES) * len(ROWS) * 2 * 0.02 * args.calls / 41:.0f} s plus weight set-up")
    write(run(args.threads, args.calls), args.out, args.name)


if __name__ == "__main__":
    main()
