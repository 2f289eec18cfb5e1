"""Decode speed before and after a change: `gqa bench generate` on two commits, interleaved, one results file.

Each side runs from a clean snapshot of its commit's ``src/`` (``git archive``), so uncommitted work in
the checkout cannot leak into either side. The sides alternate round by round (before, after, then
after, before, ...) so both see the same machine load, and each number is the best over the rounds.
transformers' ``generate`` runs inside every bench run on the same weights: it is the same code on both
sides, so its before/after ratio shows how much the load moved between the sides.

    python benchmarks/generate_before_after.py --before e2de6fd --after HEAD --rounds 2 \\
        --out benchmarks/results --name generate-cpu-before-after -- --threads 1 --repeats 5

Arguments after ``--`` go to ``gqa bench generate`` on both sides (options both commits know).
Writes ``<name>.json``, ``<name>.md`` and ``<name>.png``; refuses to replace them without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def snapshot(commit: str, into: Path) -> Path:
    """Extract ``src/`` of ``commit`` into ``into``; returns the folder to put on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def run_side(src: Path, out: Path, bench_args: list[str], log) -> dict:
    """One `gqa bench generate` run with ``src`` first on the path; returns its JSON results."""
    env = {**os.environ, "PYTHONPATH": str(src), "GQA_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "gqa.bench.generate", *bench_args, "--out", str(out), "--name", "run"]
    scratch = str(out.parent)  # a temporary folder: named, not spelled out, in the results
    log(f"$ PYTHONPATH={src} {shlex.join(cmd[1:])}".replace(scratch, "<scratch>"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log(f"  done in {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f}")
    return json.loads((out / "run.json").read_text().replace(scratch, "<scratch>"))


def vs_transformers(runs: list[dict]) -> dict[tuple, float]:
    """Per (variant, batch): the best over the runs of gqa tok/s / transformers tok/s measured in the same
    run (the two are interleaved run by run, so this ratio is what the machine load moves least)."""
    out: dict[tuple, float] = {}
    for res in runs:
        hf = {
            (r["variant"], r["batch"]): r["decode_tokens_per_s"] for r in res["decode"] if r["impl"] == "transformers"
        }
        for r in res["decode"]:
            key = (r["variant"], r["batch"])
            if r["impl"] == "gqa" and key in hf:
                out[key] = max(out.get(key, 0.0), r["decode_tokens_per_s"] / hf[key])
    return out


def best_of(runs: list[dict]) -> dict:
    """Per (impl, variant, batch): the best decode tok/s over the runs; fixed budget: best tokens/s."""
    decode: dict[tuple, dict] = {}
    for res in runs:
        for r in res["decode"]:
            key = (r["impl"], r["variant"], r["batch"])
            if key not in decode or r["decode_tokens_per_s"] > decode[key]["decode_tokens_per_s"]:
                decode[key] = r
    budget: dict[str, dict] = {}
    for res in runs:
        for r in res["fixed_budget"]:
            if r["variant"] not in budget or r["tokens_per_s"] > budget[r["variant"]]["tokens_per_s"]:
                budget[r["variant"]] = r
    return {"decode": decode, "fixed_budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="commit before the change")
    parser.add_argument("--after", default="HEAD", help="commit after the change (default HEAD)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating (best of them)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--name", default="generate-cpu-before-after", help="results file stem")
    parser.add_argument("--force", action="store_true", help="replace results of the same name")
    parser.add_argument("--from-json", type=Path, help="re-summarize the runs stored in an earlier results JSON")
    parser.add_argument("bench_args", nargs="*", help="after --: options for gqa bench generate")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    paths = [args.out / f"{args.name}{s}" for s in (".json", ".md", ".png")]
    if any(p.exists() for p in paths) and not args.force:
        parser.error(f"{paths[0]} exists; pass --force to replace it or choose another --name")
    sys.path.insert(0, str(REPO / "src"))
    from gqa.provenance import provenance

    if args.from_json is not None:
        prev = json.loads(args.from_json.read_text())
        result = summarize(prev["runs"], {k: prev[k] for k in _CARRIED})
        prov = dict(prev["provenance"])  # fill fields older files lack from the data they stored
        prov.setdefault("bench_torch_threads", prev["runs"]["after"][0]["torch_threads"])
        if prov.get("load_average") and prov["load_average"].get("before") is None:
            prov["load_average"] = {
                **prov["load_average"],
                "before": [round(x, 2) for x in prev["load_average_before"]],
            }
        result["provenance"] = prov
        write(result, args.out, args.name)
        for p in paths:
            print(f"wrote {p}")
        return
    commits = {
        side: _git("rev-parse", "--short", ref) for side, ref in (("before", args.before), ("after", args.after))
    }
    between = _git("log", "--oneline", f"{commits['before']}..{commits['after']}", "--", "src").splitlines()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    load_before = list(os.getloadavg())
    t_start = time.perf_counter()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="gqa-before-after-") as tmp:
        tmp = Path(tmp)
        srcs = {side: snapshot(c, tmp / f"{side}-tree") for side, c in commits.items()}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                log(f"round {r + 1}/{args.rounds}: {side} ({commits[side]})")
                runs[side].append(run_side(srcs[side], tmp / f"{side}-{r}", args.bench_args, log))
    argv = list(sys.argv[1:])
    if "--out" in argv and argv.index("--out") + 1 < len(argv):  # name the folder without this machine's path
        i = argv.index("--out") + 1
        out_path = Path(argv[i]).resolve()
        argv[i] = str(out_path.relative_to(REPO)) if out_path.is_relative_to(REPO) else "<scratch folder>"
    command = shlex.join(["python", "benchmarks/generate_before_after.py", *argv])
    first = runs["after"][0]
    meta = {
        "commits": commits,
        "src_commits_between": between,
        "rounds": args.rounds,
        "bench_args": args.bench_args,
        "model": first["model"],
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "elapsed_seconds": time.perf_counter() - t_start,
        "log": log_lines,
    }
    result = summarize(runs, meta)
    result["provenance"] = {
        **provenance(command, first["dtype"], load_before=load_before, bench_torch_threads=first["torch_threads"]),
        "git_commit": f"{commits['after']} (after side)",
    }
    write(result, args.out, args.name)
    for p in paths:
        print(f"wrote {p}")


_CARRIED = (
    "commits",
    "src_commits_between",
    "rounds",
    "bench_args",
    "model",
    "load_average_before",
    "load_average_after",
    "elapsed_seconds",
    "log",
)


def summarize(runs: dict[str, list[dict]], meta: dict) -> dict:
    """The before/after table from the raw runs of each side (``meta``: the run's description)."""
    best = {side: best_of(rs) for side, rs in runs.items()}
    rows = []
    for (impl, variant, batch), after in best["after"]["decode"].items():
        before = best["before"]["decode"].get((impl, variant, batch))
        if before is None:
            continue
        rows.append(
            {
                "impl": impl,
                "variant": variant,
                "kv_heads": after["kv_heads"],
                "batch": batch,
                "before_tokens_per_s": before["decode_tokens_per_s"],
                "after_tokens_per_s": after["decode_tokens_per_s"],
                "ratio": after["decode_tokens_per_s"] / before["decode_tokens_per_s"],
            }
        )
    rel = {side: vs_transformers(rs) for side, rs in runs.items()}
    for row in rows:
        key = (row["variant"], row["batch"])
        if row["impl"] == "gqa" and key in rel["before"] and key in rel["after"]:
            row["before_vs_transformers"] = rel["before"][key]
            row["after_vs_transformers"] = rel["after"][key]
            row["normalized_ratio"] = rel["after"][key] / rel["before"][key]
    budget_rows = [
        {
            "variant": v,
            "before_tokens_per_s": best["before"]["fixed_budget"][v]["tokens_per_s"],
            "after_tokens_per_s": a["tokens_per_s"],
            "ratio": a["tokens_per_s"] / best["before"]["fixed_budget"][v]["tokens_per_s"],
            "max_concurrent_sequences": a["max_concurrent_sequences"],
        }
        for v, a in best["after"]["fixed_budget"].items()
        if v in best["before"]["fixed_budget"]
    ]
    return {**meta, "decode": rows, "fixed_budget": budget_rows, "runs": runs}


def _geomean(xs: list[float]) -> float:
    import math

    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def write(res: dict, out: Path, name: str) -> None:
    from matplotlib.figure import Figure

    from gqa.atomic import atomic_file, write_json_atomic, write_text_atomic
    from gqa.provenance import provenance_markdown

    write_json_atomic(out / f"{name}.json", res)
    gqa_rows = [r for r in res["decode"] if r["impl"] == "gqa"]
    hf_rows = {(r["variant"], r["batch"]): r for r in res["decode"] if r["impl"] == "transformers"}
    variants = list(dict.fromkeys(r["variant"] for r in gqa_rows))
    colors = dict(zip(variants, ["tab:red", "tab:blue", "tab:green", "tab:purple"], strict=False))

    fig = Figure(figsize=(13, 4.6))
    ax, ax2 = fig.subplots(1, 2)
    for v in variants:
        pts = sorted((r for r in gqa_rows if r["variant"] == v), key=lambda r: r["batch"])
        b = [p["batch"] for p in pts]
        ax.plot(b, [p["before_tokens_per_s"] for p in pts], "--x", color=colors[v], label=f"{v} before")
        ax.plot(b, [p["after_tokens_per_s"] for p in pts], "-o", color=colors[v], label=f"{v} after")
        ax2.plot(b, [p["ratio"] for p in pts], "--", color=colors[v], alpha=0.5, label=f"gqa {v} (raw)")
        if all("normalized_ratio" in p for p in pts):
            ax2.plot(b, [p["normalized_ratio"] for p in pts], "-o", color=colors[v], label=f"gqa {v} / transformers")
        hf = [hf_rows[(v, p["batch"])]["ratio"] for p in pts if (v, p["batch"]) in hf_rows]
        if len(hf) == len(b):
            ax2.plot(b, hf, ":", color=colors[v], alpha=0.6, label=f"transformers {v} (load control)")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in gqa_rows})
        a.set_xticks(batches, [str(x) for x in batches])
        a.minorticks_off()
        a.set_xlabel("batch size")
        a.grid(alpha=0.3)
    ax.set_ylabel("gqa decode tokens/s")
    ax.set_title("gqa decode throughput (dashed: before, solid: after)")
    ax.legend(fontsize=7)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_ylabel("after / before")
    ax2.set_title("after/before (solid: relative to transformers in the same run)")
    ax2.legend(fontsize=7)
    fig.suptitle(
        f"{res['model']} · before {res['commits']['before']} vs after {res['commits']['after']} · "
        f"{res['provenance']['machine'].split(';')[0]}; bench torch threads "
        f"{res['provenance'].get('bench_torch_threads', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_file(out / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")

    g_gqa = _geomean([r["ratio"] for r in gqa_rows])
    g_hf = _geomean([r["ratio"] for r in hf_rows.values()])
    g_norm = _geomean([r["normalized_ratio"] for r in gqa_rows if "normalized_ratio" in r])
    lines = [
        f"# Decode speed before and after: {res['model']}",
        "",
        provenance_markdown(res["provenance"]),
        f"- before: commit {res['commits']['before']}; after: commit {res['commits']['after']}",
        f"- `gqa bench generate {shlex.join(res['bench_args'])}` on each side, {res['rounds']} rounds, sides "
        "alternating (before/after, then after/before, ...), each side from a clean `git archive` of its commit; "
        "every number is the best over the rounds",
        f"- total run time {res['elapsed_seconds'] / 60:.1f} min; each bench run used "
        f"{res['provenance'].get('bench_torch_threads', '?')} torch thread(s); a load average above the CPU count "
        "means other jobs competed for the cores",
        "",
        "Commits touching `src/` between the two sides:",
        "",
        *[f"- {c}" for c in res["src_commits_between"]],
        "",
        f"**Geometric mean after/before: gqa {g_gqa:.3f}x; transformers {g_hf:.3f}x; gqa relative to transformers "
        f"in the same run {g_norm:.3f}x.** transformers runs the same code on both sides, so its after/before is what "
        "the load alone moved; the last column divides it out: (gqa/transformers after) / (gqa/transformers before), "
        "each the best over the rounds of the ratio measured within one run.",
        "",
        "| variant | KV heads | batch | gqa before tok/s | gqa after tok/s | after/before | transformers after/before "
        "| gqa/transformers before | after | normalized after/before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gqa_rows:
        hf = hf_rows.get((r["variant"], r["batch"]))
        norm = (
            f"{r['before_vs_transformers']:.2f}x | {r['after_vs_transformers']:.2f}x | {r['normalized_ratio']:.2f}x |"
            if "normalized_ratio" in r
            else "- | - | - |"
        )
        lines.append(
            f"| {r['variant']} | {r['kv_heads']} | {r['batch']} | {r['before_tokens_per_s']:.0f} | "
            f"{r['after_tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
            + (f"{hf['ratio']:.2f}x | " if hf else "- | ")
            + norm
        )
    lines += [
        "",
        "## Continuous batching in a fixed KV budget (paged cache)",
        "",
        "The scheduler's run has no transformers counterpart, so these ratios carry the load's noise unchanged.",
        "",
        "| variant | max concurrent sequences | before tokens/s | after tokens/s | after/before |",
        "|---|---|---|---|---|",
    ]
    for r in res["fixed_budget"]:
        lines.append(
            f"| {r['variant']} | {r['max_concurrent_sequences']} | {r['before_tokens_per_s']:.0f} | "
            f"{r['after_tokens_per_s']:.0f} | {r['ratio']:.2f}x |"
        )
    lines += ["", f"![plot]({name}.png)", ""]
    write_text_atomic(out / f"{name}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
