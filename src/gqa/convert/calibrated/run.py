"""Checkpoint in, checkpoint out: activation-aware KV-head reduction (``gqa convert --calib ...``).

Unlike the streaming :func:`gqa.convert.convert_checkpoint`, this loads the model (a transformers
Llama-family folder, a gqa ``checkpoint.pt`` or a GGUF file), runs it on calibration text, and
writes a transformers folder (per-layer KV heads in ``per_layer_config`` when they differ) or, with
``export="decilm"``, the DeciLM / Nemotron-NAS layout. Everything is validated before the model is
loaded; the output is written to a temporary folder beside OUT and renamed at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gqa.grouping.budget import budget_heads, choose_kv_heads, parse_kv_heads_per_layer
from gqa.grouping.pipeline import GROUPINGS, MERGES, error_curves, reduce_kv_heads
from gqa.grouping.stats import calibration_ids, collect_statistics

__all__ = ["convert_grouped", "GROUPING_REPORT_NAME", "EXPORTS"]

GROUPING_REPORT_NAME = "grouping_report.json"
EXPORTS = ("hf", "decilm")


def _count_targets(kv_heads, kv_heads_per_layer, kv_budget) -> None:
    given = [
        n
        for n, v in (("--kv-heads", kv_heads), ("--kv-heads-per-layer", kv_heads_per_layer), ("--kv-budget", kv_budget))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget"
            + (f" (got {', '.join(given)})" if given else "")
        )


def convert_grouped(
    src: str | Path,
    out: str | Path,
    *,
    kv_heads: int | None = None,
    kv_heads_per_layer: str | list[int] | None = None,
    kv_budget: float | None = None,
    grouping: str = "similarity",
    merge: str = "fit",
    align: bool = True,
    calib: str | None = None,
    calib_tokens: int = 65536,
    seq_len: int = 256,
    export: str = "hf",
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Reduce ``src``'s KV heads using calibration activations and write the result to ``out``.

    Exactly one target: ``kv_heads`` (every layer), ``kv_heads_per_layer`` (``"4,4,2,..."``, each a
    divisor of the layer's KV heads) or ``kv_budget`` (a fraction of the original KV-cache bytes;
    each layer's count is chosen by dynamic programming over measured per-layer error curves).
    calib: a data spec for :func:`gqa.data.load_text` (``shakespeare:train``, a file, a folder...);
    needed for similarity grouping, alignment, merges other than ``mean`` and budgets.
    Returns the report written to ``out/grouping_report.json``. Query head h reads KV head
    h // (Hq // Hkv_layer) in the output.
    """
    from gqa.data import load_text
    from gqa.evaluate import load_model, load_model_tokenizer

    t0 = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    _count_targets(kv_heads, kv_heads_per_layer, kv_budget)
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown --grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    if merge not in MERGES:
        raise ValueError(f"unknown --merge {merge!r} for calibrated conversion; choose one of {', '.join(MERGES)}")
    if export not in EXPORTS:
        raise ValueError(f"unknown --export {export!r}; choose one of {', '.join(EXPORTS)}")
    needs_calib = grouping == "similarity" or align or merge != "mean" or kv_budget is not None
    if needs_calib and calib is None:
        raise ValueError("--calib TEXT is needed for similarity grouping, alignment, --merge fit and --kv-budget")
    if calib_tokens < 1:
        raise ValueError(f"--calib-tokens must be >= 1, got {calib_tokens}")
    if not src.exists():
        raise FileNotFoundError(
            f"{src} does not exist; pass a transformers model folder, a checkpoint.pt or a .gguf file"
        )
    s, o = src.resolve(), out.resolve()
    if s == o or o.is_relative_to(s) or s.is_relative_to(o):
        raise ValueError(f"OUT {out} must lie outside SRC {src}: the source is never modified")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another OUT or pass --force to replace it")
    calib_text = load_text(calib) if calib is not None else None

    model = load_model(src, dtype=torch.float32)
    from gqa.model import GQAForCausalLM

    if not isinstance(model, GQAForCausalLM):
        raise ValueError(f"{src} is not a llama/mistral/qwen2/qwen3 model; calibrated conversion needs one of those")
    cfg = model.config
    before = cfg.kv_heads_per_layer
    if kv_heads is not None:
        per_layer = parse_kv_heads_per_layer([kv_heads] * cfg.n_layers, before, cfg.n_heads)
    elif kv_heads_per_layer is not None:
        per_layer = parse_kv_heads_per_layer(kv_heads_per_layer, before, cfg.n_heads)
    else:
        max_heads = budget_heads(kv_budget, before)
        per_layer = None
    stats, ids = None, None
    if needs_calib:
        tokenizer = load_model_tokenizer(src)
        ids = calibration_ids(calib_text, tokenizer, calib_tokens, seq_len)
        attention_sequences = 4 if merge in ("lsq", "fit") else 0
        stats = collect_statistics(model, ids, attention_sequences=attention_sequences, progress=progress)
    curves = None
    if per_layer is None:
        curves = error_curves(
            model, stats, grouping=grouping, align=align, merge=merge, calib_ids=ids[:4], progress=progress
        )
        per_layer = choose_kv_heads(curves, max_heads)
    new, results = reduce_kv_heads(
        model, per_layer, stats, grouping=grouping, align=align, merge=merge, progress=progress
    )

    elem = torch.empty((), dtype=dtype or torch.bfloat16).element_size()
    d_head = cfg.resolved_head_dim
    report = {
        "source": str(src),
        "output": str(out),
        "export": export,
        "grouping": grouping,
        "align": align,
        "merge": merge,
        "calibration": None if calib is None else {"spec": str(calib), "tokens": calib_tokens, "seq_len": seq_len},
        "kv_budget": kv_budget,
        "kv_heads_before": before,
        "kv_heads_after": per_layer,
        "kv_cache_bytes_per_token_before": 2 * sum(before) * d_head * elem,
        "kv_cache_bytes_per_token_after": 2 * sum(per_layer) * d_head * elem,
        "kv_cache_dtype": str(dtype or torch.bfloat16).replace("torch.", ""),
        "layers": [
            {"groups": r.groups, "merge": r.merge, "error": r.error, "kv_heads": r.kv_heads_after} for r in results
        ],
        "error_curves": None if curves is None else [{str(k): v for k, v in c.items()} for c in curves],
        "seconds": round(time.perf_counter() - t0, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write(new, out, export, dtype, src, report, force)
    return report


def _write(model, out: Path, export: str, dtype, src: Path, report: dict, force: bool) -> None:
    from gqa.export import export_decilm
    from gqa.model import save_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        target = staging / "model"
        side = src if src.is_dir() else (src.parent if src.suffix == ".pt" else None)
        if export == "decilm":
            export_decilm(model, target, dtype=dtype, side_files_from=side)
        else:
            save_hf(model, target, dtype=dtype, side_files_from=side)
        if src.suffix.lower() == ".gguf":  # the tokenizer lives inside the GGUF file
            from gqa.evaluate import load_model_tokenizer

            load_model_tokenizer(src).save_pretrained(str(target))
        (target / GROUPING_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} exists; choose another OUT or pass --force to replace it")
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
