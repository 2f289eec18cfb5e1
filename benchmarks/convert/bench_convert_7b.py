"""Benchmark `gqa convert` on a Llama-2-7B-shaped checkpoint of random weights, beside a plain copy.

Generates a Llama-2-7B-shaped fp16 checkpoint (32 layers, 32 query and 32 KV heads, head_dim 128,
two safetensors shards split like the published one, ~13.5 GB) in a scratch folder outside the
repository, then in the same run:

1. copies the checkpoint files (each copy fsynced) -- the I/O floor any conversion pays;
2. converts it to ``--kv-heads`` KV heads with ``merge="mean"`` (output fsynced).

Both run in a child process, so each one's peak RSS is measured on its own, and the source files
are dropped from the page cache (posix_fadvise DONTNEED) before each, so both read cold. Results go
to ``benchmarks/convert/results-7b.json``, ``docs/results/convert-7b-benchmark.md`` and a PNG plot.
The scratch folder is deleted at the end unless ``--keep``.

    python benchmarks/convert/bench_convert_7b.py --scratch /tmp/gqa-bench-7b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gqa.provenance import git_commit, provenance, provenance_markdown

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json)
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
FIRST_SHARD_BYTES = 9_976_576_152  # size of model-00001-of-00002.safetensors in the published checkpoint


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    specs = [("model.embed_tokens.weight", (v, d))]
    for i in range(n):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d))]
        specs += [(p + "mlp.down_proj.weight", (d, f))]
        specs += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    specs += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return specs


def generate(folder: Path, seed: int = 0) -> int:
    """Write the random fp16 checkpoint tensor by tensor; returns the total bytes."""
    import torch
    from tqdm import tqdm

    from gqa.formats.transformers.safetensors import SafetensorsWriter

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(LLAMA2_7B)
    shards, current, size = [[]], 0, 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current + nbytes > FIRST_SHARD_BYTES and len(shards) == 1:
            shards.append([])
            current = 0
        shards[-1].append((name, shape))
        current += nbytes
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="generate")
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        w = SafetensorsWriter(folder / file_name, [(n, torch.float16, s) for n, s in shard])
        for n, s in shard:
            if len(s) == 1:
                t = torch.ones(s, dtype=torch.float16)  # norm scales
            else:
                t = torch.empty(s, dtype=torch.float16).normal_(0.0, 0.02)
            w.write(n, t)
            weight_map[n] = file_name
            bar.update(t.numel() * 2)
        w.close()
    bar.close()
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B, indent=2))
    return size


def drop_cache(folder: Path) -> None:
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


COPY_CHILD = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for p in sorted(src.iterdir()):
    shutil.copyfile(p, dst / p.name)
    fd = os.open(dst / p.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

CONVERT_CHILD = """
import sys
from gqa.convert import convert
report = convert(sys.argv[1], sys.argv[2], kv_heads=int(sys.argv[3]), merge="mean", progress=True, fsync=True)
assert report.path == "streaming", report.path
"""


# Each child writes its own /proc/self/status at the end: VmHWM is the peak RSS of that process
# alone (ru_maxrss of a child would include the parent's RSS at fork time on Linux).
REPORT_HWM = """
from pathlib import Path
Path(sys.argv[-1]).write_text(Path("/proc/self/status").read_text())
"""


def run_child(code: str, *args: str) -> tuple[float, float]:
    """Run ``code`` in a fresh Python; returns (wall seconds, peak RSS of that child in GiB)."""
    status_file = Path(tempfile.mkstemp(prefix="gqa-bench-status-")[1])
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code + REPORT_HWM, *args, str(status_file)], check=True)
        wall = time.perf_counter() - t0
        hwm = next(ln for ln in status_file.read_text().splitlines() if ln.startswith("VmHWM:"))
    finally:
        status_file.unlink(missing_ok=True)
    return wall, int(hwm.split()[1]) / 1024**2  # kB -> GiB


SCRATCH_MARKER = ".gqa-benchmark-scratch"


def fresh_scratch(scratch: Path) -> None:
    """Create ``scratch`` empty, deleting an earlier run's (one holding :data:`SCRATCH_MARKER`); any
    other existing folder is refused with a one-line error rather than deleted."""
    if scratch.exists():
        if not (scratch / SCRATCH_MARKER).is_file():
            raise SystemExit(
                f"--scratch {scratch} exists and was not made by this benchmark; give a new or empty path"
            )
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    (scratch / SCRATCH_MARKER).write_text("made by a gqa benchmark; deleted by the next run\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/gqa-bench-7b"))
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick dry run (results not written)")
    args = ap.parse_args()

    scratch = args.scratch
    LLAMA2_7B["num_hidden_layers"] = args.layers
    fresh_scratch(scratch)
    src, copy_dst, out = scratch / "llama2-7b-random", scratch / "copy", scratch / f"kv{args.kv_heads}"
    commit = git_commit(["src/gqa/convert"])  # the code that runs, even if HEAD moves while the benchmark does
    try:
        load = {"start": os.getloadavg()}
        t0 = time.perf_counter()
        size = generate(src)
        gen_s = time.perf_counter() - t0
        drop_cache(src)
        load["before_copy"] = os.getloadavg()
        copy_s, copy_rss = run_child(COPY_CHILD, str(src), str(copy_dst))
        shutil.rmtree(copy_dst)
        drop_cache(src)
        load["before_convert"] = os.getloadavg()
        conv_s, conv_rss = run_child(CONVERT_CHILD, str(src), str(out), str(args.kv_heads))
        load["end"] = os.getloadavg()
        report = json.loads((out / "conversion_report.json").read_text())
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    prov = provenance(
        command="python benchmarks/convert/bench_convert_7b.py " + " ".join(sys.argv[1:]),
        dtype="float16",
        load_before=load["start"],
    )
    prov["git_commit"] = commit  # the code that ran, stamped before the run
    prov["memory_gib"] = round(mem_gib, 1)
    prov["cores"] = os.cpu_count()
    prov["load_average_1_5_15"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
    prov["note"] = "CPU and disk shared with other jobs; see the load averages"
    result = {
        "what": "gqa convert of a Llama-2-7B-shaped fp16 checkpoint (random weights, 2 safetensors shards)",
        "kv_heads": [32, args.kv_heads],
        "merge": "mean",
        "path": report["path"],
        "checkpoint_bytes": size,
        "output_bytes": out_bytes,
        "generate_seconds": round(gen_s, 1),
        "copy_seconds": round(copy_s, 1),
        "copy_peak_rss_gib": round(copy_rss, 3),
        "convert_seconds": round(conv_s, 1),
        "convert_peak_rss_gib": round(conv_rss, 3),
        "convert_over_copy": round(conv_s / copy_s, 2),
        "parameters_removed": report["parameters_removed"],
        "kv_cache_bytes_per_token": [
            report["kv_cache_bytes_per_token_before"],
            report["kv_cache_bytes_per_token_after"],
        ],
        "provenance": prov,
    }
    if args.layers != 32:
        print(json.dumps(result, indent=2))
        return
    (HERE / "results-7b.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, HERE / "convert-7b.png")
    write_markdown(result, REPO / "docs" / "results" / "convert-7b-benchmark.md")
    print(json.dumps(result, indent=2))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = ["plain copy", f"gqa convert\n32 -> {r['kv_heads'][1]} KV heads"]
    a.bar(labels, [r["copy_seconds"], r["convert_seconds"]], color=["#999", "#3a7"])
    a.axhline(2 * r["copy_seconds"], ls="--", c="k", lw=1, label="goal: 2x copy")
    a.set_ylabel("wall time (s)")
    a.legend(fontsize=8)
    b.bar(labels, [r["copy_peak_rss_gib"], r["convert_peak_rss_gib"]], color=["#999", "#3a7"])
    b.axhline(3, ls="--", c="k", lw=1, label="goal: 3 GiB")
    b.set_ylabel("peak RSS (GiB)")
    b.legend(fontsize=8)
    gb = r["checkpoint_bytes"] / 1e9
    fig.suptitle(
        f"Llama-2-7B-shaped fp16 checkpoint ({gb:.1f} GB), {r['provenance']['cores']} shared cores", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(r: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = r["provenance"]
    la = p["load_average_1_5_15"]
    kv = r["kv_cache_bytes_per_token"]
    text = f"""# `gqa convert` on a Llama-2-7B-shaped checkpoint

{r["what"]}; 32 -> {r["kv_heads"][1]} KV heads with the paper's mean pooling. Copy and conversion ran
in the same session, each in its own process, each starting with the source out of the page cache,
each fsyncing what it wrote.

| | wall time | peak RSS |
|---|---|---|
| plain copy of the files | {r["copy_seconds"]} s | {r["copy_peak_rss_gib"]} GiB |
| `gqa convert --kv-heads {r["kv_heads"][1]}` | {r["convert_seconds"]} s ({r["convert_over_copy"]}x copy) | {r["convert_peak_rss_gib"]} GiB |
| goal | <= 2x copy | <= 3 GiB |

- Checkpoint: {r["checkpoint_bytes"] / 1e9:.2f} GB in, {r["output_bytes"] / 1e9:.2f} GB out; {r["parameters_removed"]:,} parameters removed.
- KV cache per token (fp16): {kv[0] // 1024} KiB -> {kv[1] // 1024} KiB.
- Load average (1/5/15 min) before the copy {la["before_copy"]}, before the conversion {la["before_convert"]}, at the end {la["end"]}.

![copy vs convert](../../benchmarks/convert/convert-7b.png)

Provenance ({p["note"]}; {p["cores"]} logical CPUs, {p["memory_gib"]} GiB RAM; raw numbers in
`benchmarks/convert/results-7b.json`):

{provenance_markdown(p)}"""
    path.write_text(text)


if __name__ == "__main__":
    main()
