"""Benchmark `gqa convert --calib ... --distill local` on a Llama-2-7B-shaped fp16 checkpoint: does it fit in 24 GB?

Builds the random Llama-2-7B-shaped fp16 checkpoint of ``bench_convert_7b.py`` (same builder; plus the
byte-level BPE tokenizer shipped with gqa's Shakespeare asset, 2,048 tokens, so ``--calib`` can
tokenize) in a scratch folder outside the repository, drops it from the page cache, then runs the
real CLI in a child process:

    gqa convert SRC OUT --kv-heads 8 --calib english:calib --calib-tokens 2048 --distill local --distill-steps 4

and records its wall time and memory: the child's peak RSS (``VmHWM`` of its own process) and its
peak *anonymous* RSS, sampled every 0.1 s from ``/proc/PID/status``. The difference is file pages:
safetensors maps the checkpoint while it loads, and those clean, reclaimable page-cache pages count in
RSS too; the anonymous peak is the memory that must fit. Goal: peak anonymous RSS <= 22 GiB (a 24 GB
host, room left for the OS). The result also states what the same run would hold without the memory
work (a float32 teacher plus a full float32 copy as the student, as before; and the bf16 / fp16
sizes: teacher + unshared student), computed from the config.

Results go to ``benchmarks/convert/results-7b-distill.json`` and ``docs/results/convert-7b-distill.md``
for the full 32 layers; ``--layers N`` builds a shallower model and appends its result to
``benchmarks/convert/results-7b-distill-layers.json`` (runs at several depths give the memory per layer). The scratch folder (~13.5 GB in, ~11.9 GB out) is deleted at the end unless ``--keep``.

    python benchmarks/convert/bench_convert_7b_distill.py --scratch /tmp/gqa-bench-7b-distill
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_convert_7b import LLAMA2_7B, drop_cache, fresh_scratch, generate  # noqa: E402  (the checkpoint builder)

from gqa.provenance import git_commit, provenance, provenance_markdown  # noqa: E402

TOKENIZER_ASSET = REPO / "src" / "gqa" / "assets" / "shakespeare-mha"
GOAL_GIB = 22.0

# Runs the real CLI (the typer app behind the `gqa` script) and, once it returns, writes this process's
# /proc/self/status: VmHWM is the peak RSS of this process alone (ru_maxrss of a child also counts the
# parent's RSS when it was spawned).
CLI_CHILD = """
import sys
from pathlib import Path
from gqa.cli import app
status, args = sys.argv[1], sys.argv[2:]
try:
    app(args, prog_name="gqa")
except SystemExit as e:
    if e.code not in (0, None):
        raise
Path(status).write_text(Path("/proc/self/status").read_text())
"""


def _status_kib(text: str, key: str) -> int:
    line = next(ln for ln in text.splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1])


def run_cli(args: list[str], *, nice: int) -> dict:
    """Run ``gqa <args>`` in a child Python; wall seconds, peak RSS and sampled peak anonymous RSS (GiB)."""
    status_file = Path(tempfile.mkstemp(prefix="gqa-bench-status-")[1])
    peak = {"anon": 0, "rss": 0}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_CHILD, str(status_file), *args],
            env=env,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        stop = threading.Event()

        def sample() -> None:
            path = Path(f"/proc/{proc.pid}/status")
            while not stop.is_set():
                try:
                    text = path.read_text()
                    peak["anon"] = max(peak["anon"], _status_kib(text, "RssAnon"))
                    peak["rss"] = max(peak["rss"], _status_kib(text, "VmRSS"))
                except (OSError, StopIteration, ValueError):
                    pass
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if rc != 0:
            raise SystemExit(f"gqa {' '.join(args)} failed with exit status {rc}")
        status = status_file.read_text()
    finally:
        status_file.unlink(missing_ok=True)
    gib = 1024**2  # kB -> GiB
    return {
        "seconds": wall,
        "peak_rss_gib": _status_kib(status, "VmHWM") / gib,
        "peak_anon_rss_gib": max(peak["anon"], _status_kib(status, "RssAnon")) / gib,
        "peak_rss_sampled_gib": peak["rss"] / gib,
    }


def model_bytes(cfg: dict, kv_heads: int) -> dict:
    """Parameter counts and what the run holds with and without the memory work, from the config."""
    d, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hq = cfg["num_attention_heads"]
    dh = d // hq
    hkv = cfg["num_key_value_heads"]
    attn_src = n * (2 * d * hq * dh + 2 * d * hkv * dh)
    attn_new = n * (2 * d * hq * dh + 2 * d * kv_heads * dh)
    rest = 2 * v * d + n * (3 * d * f + 2 * d) + d  # embeddings, LM head, MLPs, norms
    moments = n * (d + 1) ** 2 * 8  # float64 input second moments (calibration statistics)
    src, new = rest + attn_src, rest + attn_new
    return {
        "parameters_source": src,
        "parameters_converted": new,
        "teacher_bytes_held": 2 * src,  # fp16, as stored
        "student_new_attention_bytes": 4 * attn_new,  # float32, the only student tensors not shared
        "calibration_moment_bytes": moments,
        # before: both models in float32, the student a full copy, statistics held through the reduction
        "before_bytes": 4 * src + 4 * new + moments,
        # teacher + unshared student in the checkpoint's dtype (what a bf16/fp16 load alone would give)
        "unshared_half_bytes": 2 * src + 2 * new,
        # now: fp16 teacher + float32 rebuilt attention (statistics are released as it grows)
        "now_bytes": 2 * src + max(4 * attn_new, moments),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/gqa-bench-7b-distill"))
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--calib", default="english:calib")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="8 sequences of 256: 7 train, 1 held out")
    ap.add_argument("--distill-steps", type=int, default=4)
    ap.add_argument("--grouping", default=None, help="passed to gqa convert (default: its own)")
    ap.add_argument("--merge", default=None, help="passed to gqa convert (default: its own)")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick dry run (results not written)")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the conversion child")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()

    LLAMA2_7B["num_hidden_layers"] = args.layers
    cfg = dict(LLAMA2_7B)
    scratch = args.scratch
    fresh_scratch(scratch)
    src, out = scratch / "llama2-7b-random", scratch / f"kv{args.kv_heads}-distill"
    cli_args = [
        "convert", str(src), str(out), "--kv-heads", str(args.kv_heads), "--calib", args.calib,
        "--calib-tokens", str(args.calib_tokens), "--distill", "local", "--distill-steps", str(args.distill_steps),
    ]  # fmt: skip
    for flag, value in (("--grouping", args.grouping), ("--merge", args.merge)):
        if value is not None:
            cli_args += [flag, value]
    shown = ["gqa", *cli_args]
    shown[2:4] = ["SRC", "OUT"]
    commit = git_commit(["src/gqa/convert"])  # the code that runs, even if HEAD moves while the benchmark does
    try:
        load = {"start": os.getloadavg()}
        t0 = time.perf_counter()
        size = generate(src)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(TOKENIZER_ASSET / name, src / name)
        gen_s = time.perf_counter() - t0
        drop_cache(src)
        load["before_convert"] = os.getloadavg()
        run = run_cli(cli_args, nice=args.nice)
        load["end"] = os.getloadavg()
        report = json.loads((out / "conversion_report.json").read_text())
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    sizes = model_bytes(cfg, args.kv_heads)
    gib = 1024**3
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / gib
    prov = provenance(
        command="python benchmarks/convert/bench_convert_7b_distill.py " + " ".join(sys.argv[1:]),
        dtype="float16",
        load_before=load["start"],
    )
    prov["git_commit"] = commit
    prov["memory_gib"] = round(mem_gib, 1)
    prov["cores"] = os.cpu_count()
    prov["load_average_1_5_15"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
    prov["note"] = "CPU and disk shared with other jobs; see the load averages"
    distill = report.get("distill") or {}
    result = {
        "what": (
            f"gqa convert --calib --distill local of a Llama-2-7B-shaped fp16 checkpoint "
            f"(random weights, {args.layers} layers, 2 safetensors shards)"
        ),
        "command": " ".join(shown),
        "layers": args.layers,
        "kv_heads": [cfg["num_key_value_heads"], args.kv_heads],
        "calib": args.calib,
        "calib_tokens": args.calib_tokens,
        "distill_steps": args.distill_steps,
        "path": report["path"],
        "checkpoint_bytes": size,
        "output_bytes": out_bytes,
        "generate_seconds": round(gen_s, 1),
        "convert_seconds": round(run["seconds"], 1),
        "distill_seconds": distill.get("seconds"),
        "peak_rss_gib": round(run["peak_rss_gib"], 3),
        "peak_anon_rss_gib": round(run["peak_anon_rss_gib"], 3),
        "peak_rss_sampled_gib": round(run["peak_rss_sampled_gib"], 3),
        "goal_peak_anon_rss_gib": GOAL_GIB,
        "fits": run["peak_anon_rss_gib"] <= GOAL_GIB,
        "sizes_gib": {k: round(val / gib, 3) for k, val in sizes.items() if "bytes" in k},
        "parameters": [sizes["parameters_source"], sizes["parameters_converted"]],
        "distill_error_before_after": [distill.get("error_before_total"), distill.get("error_after_total")],
        "provenance": prov,
    }
    if args.layers != 32:  # a shallower model: kept beside the others, to extrapolate memory per layer
        partial = HERE / "results-7b-distill-layers.json"
        runs = json.loads(partial.read_text()) if partial.is_file() else []
        partial.write_text(json.dumps([*runs, result], indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    (HERE / "results-7b-distill.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, REPO / "docs" / "results" / "convert-7b-distill.md")
    print(json.dumps(result, indent=2))


def write_markdown(r: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = r["provenance"]
    la = p["load_average_1_5_15"]
    s = r["sizes_gib"]
    verdict = "fits" if r["fits"] else "does NOT fit"
    text = f"""# `gqa convert --distill local` on a Llama-2-7B-shaped checkpoint: memory

{r["what"]}; {r["kv_heads"][0]} -> {r["kv_heads"][1]} KV heads, calibrated on `{r["calib"]}`
({r["calib_tokens"]:,} tokens), {r["distill_steps"]} distillation steps per layer. One run of the real CLI
in its own process, the source out of the page cache at the start:

    {r["command"]}

| | wall time | peak anonymous RSS | peak RSS (VmHWM) |
|---|---|---|---|
| this run | {r["convert_seconds"]} s (distillation {r["distill_seconds"]} s) | **{r["peak_anon_rss_gib"]} GiB** | {r["peak_rss_gib"]} GiB |
| goal (24 GB host) | | <= {r["goal_peak_anon_rss_gib"]} GiB | |

Verdict: it {verdict} in a 24 GB machine. Anonymous RSS is the memory that must fit; VmHWM also counts the
page-cache pages of the memory-mapped checkpoint while it loads (clean, reclaimable under pressure).

What the same run would hold, from the config (GiB):

| | GiB |
|---|---|
| before: float32 teacher + full float32 copy as student + calibration moments | {s["before_bytes"]} |
| fp16 teacher + unshared fp16 student | {s["unshared_half_bytes"]} |
| now: fp16 teacher ({s["teacher_bytes_held"]}) + rebuilt float32 attention ({s["student_new_attention_bytes"]}) or the calibration moments ({s["calibration_moment_bytes"]}), released as the attention grows | {s["now_bytes"]} |

- Checkpoint: {r["checkpoint_bytes"] / 1e9:.2f} GB in, {r["output_bytes"] / 1e9:.2f} GB out; {r["parameters"][0]:,} -> {r["parameters"][1]:,} parameters.
- Held-out distillation error (sum over layers): {r["distill_error_before_after"][0]} -> {r["distill_error_before_after"][1]}
  (random weights: only the memory and time are meaningful here).
- Load average (1/5/15 min) at the start {la["start"]}, before the conversion {la["before_convert"]}, at the end {la["end"]}.

Provenance ({p["note"]}; {p["cores"]} logical CPUs, {p["memory_gib"]} GiB RAM; raw numbers in
`benchmarks/convert/results-7b-distill.json`):

{provenance_markdown(p)}"""
    path.write_text(text)


if __name__ == "__main__":
    main()
