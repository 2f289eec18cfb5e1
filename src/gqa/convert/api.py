"""``gqa.convert.convert``: the one entry point of the converter (``gqa convert`` calls it).

It validates every option before reading weights, then routes:

- **streaming** (nothing needs calibration, ``export="hf"``): tensor by tensor, peak memory about
  the largest tensor (:mod:`gqa.convert.streaming`); any family in :data:`SUPPORTED_MODEL_TYPES`.
- **calibrated** (``calib`` given, a merge or grouping that needs it, a KV budget, distillation, or an
  export that needs the model in memory): the model is loaded, run on calibration text through
  forward hooks, grouped, aligned, merged, optionally distilled, and written by the export registry
  (:mod:`gqa.convert.calibrated`).

Every combination either works or is refused with one line (:class:`gqa.errors.GQAUserError`).
Head mapping before and after: query head h of layer i reads KV head h // (Hq // Hkv_i).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from gqa.convert.exports import export_for
from gqa.convert.merge import merge_method
from gqa.convert.report import REPORT_NAME, ConversionReport
from gqa.errors import GQAUserError
from gqa.units import check_seed

__all__ = ["convert", "OUTPUT_DTYPES", "GROUPINGS", "DISTILL_PARAMS", "DISTILL_INPUTS", "check_paths"]

OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
GROUPINGS = ("contiguous", "similarity")
DISTILL_METHODS = ("local",)
DISTILL_PARAMS = ("kv", "qkvo")
DISTILL_INPUTS = ("original", "converted")


def _int_option(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GQAUserError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise GQAUserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _per_layer_spec(spec) -> list[int]:
    """``"4,4,2"`` or ``[4, 4, 2]`` -> a list of ints (one-line error otherwise)."""
    if isinstance(spec, str):
        try:
            return [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise GQAUserError(f"--kv-heads-per-layer must be comma-separated integers, got {spec!r}") from None
    try:
        heads = list(spec)
    except TypeError:
        raise GQAUserError(f"--kv-heads-per-layer must be a list of integers, got {spec!r}") from None
    if not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        raise GQAUserError(f"--kv-heads-per-layer must be a list of integers, got {spec!r}")
    return heads


def _check_gguf_target(src: Path, kv_heads: int) -> None:
    """A --kv-heads that the GGUF's header already rules out is refused before the file is dequantized
    (about 20 s for SmolLM2 on 2 cores)."""
    from gqa.convert.groups import check_kv_heads
    from gqa.formats.gguf import read_gguf_header

    header = read_gguf_header(src)
    for hq, hkv in sorted(set(zip(header.heads or (), header.kv_heads or (), strict=False))):
        if hkv:  # 0: a layer without attention (deci)
            check_kv_heads(hkv, hq, kv_heads)


def check_paths(src: Path, out: Path, force: bool) -> None:
    """SRC must exist; OUT must not be SRC, lie inside it, contain it, or contain the working directory;
    an existing OUT is replaced only with ``force`` and only when gqa convert wrote it (its report is
    there): :func:`gqa.atomic.check_replaceable`, checked again under the writer's lock."""
    from gqa.atomic import check_replaceable

    if not src.exists():
        raise GQAUserError(f"{src} does not exist; pass a transformers model folder or a .gguf file")
    s, o = src.resolve(), out.resolve()
    if s == o or o.is_relative_to(s) or s.is_relative_to(o):
        raise GQAUserError(f"OUT {out} must lie outside SRC {src} (and not contain it): the source is never modified")
    if Path.cwd().resolve().is_relative_to(o):
        raise GQAUserError(f"OUT {out} is the current directory or contains it; choose a new folder for the output")
    check_replaceable(out, force, marker=REPORT_NAME)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    kv_heads: int | None = None,
    kv_heads_per_layer: str | list[int] | None = None,
    kv_budget: float | None = None,
    grouping: str = "contiguous",
    merge: str = "mean",
    calib: str | None = None,
    calib_tokens: int = 65536,
    seq_len: int = 256,
    export: str = "hf",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    distill: str | None = None,
    distill_steps: int = 150,
    distill_params: str = "qkvo",
    distill_inputs: str = "converted",
    distill_lr: float = 3e-3,
    groups=None,
    fsync: bool = False,
) -> ConversionReport:
    """Convert the checkpoint at ``src`` to other KV-head counts and write it to ``out``.

    Args:
        src: a transformers model folder (``config.json`` + safetensors, sharded or not) or a GGUF
            file; the calibrated path also reads a gqa ``checkpoint.pt``.
        out: the output folder, built under ``.OUT.partial-*`` beside it and renamed at the end.
        kv_heads: N KV heads in every layer. A divisor of the checkpoint's Hkv merges equal groups; a
            multiple of Hkv that divides Hq replicates heads (exact: new head j = old head j // r).
        kv_heads_per_layer: one count per layer (``"4,4,2"`` or a list), each as for ``kv_heads``.
        kv_budget: a fraction in (0, 1] of the original KV-cache bytes; per-layer counts are chosen by
            dynamic programming over measured error curves (needs ``calib``). Give exactly one target.
        grouping: ``contiguous`` (the paper: neighbours share) or ``similarity`` (balanced groups of
            the most similar aligned heads; needs ``calib``).
        merge: a name in :data:`gqa.convert.merge.MERGES`: ``mean`` / ``first`` / ``random`` stream;
            ``weighted`` / ``lsq`` / ``fit`` need ``calib``.
        calib: calibration text for :func:`gqa.data.load_text` (a file, a folder, ``shakespeare:train``...);
            giving it also aligns each group's heads (exact rotations folded into Q/K/V/O) before merging.
        calib_tokens / seq_len: calibration tokens to run, in sequences of ``seq_len``.
        export: a name in :data:`gqa.convert.exports.EXPORTS` (``hf``, ``decilm``, ``gguf``).
        dtype: ``float32`` / ``bfloat16`` / ``float16`` for the output's float tensors; None keeps the
            source's dtype (GGUF input is dequantized to float32).
        seed: seeds everything random (``merge="random"``, distillation).
        force: replace an existing ``out`` that gqa convert wrote (its report is there); never another folder.
        distill: ``"local"``: after merging, fit each reduced attention block to the original's output
            on the calibration text, one layer at a time (needs ``calib``); ``distill_steps``,
            ``distill_params`` (``kv`` or ``qkvo``), ``distill_inputs`` (``converted``: each layer sees
            the converted model's own inputs and also corrects the drift of the layers before it, or
            ``original``) and ``distill_lr`` (Adam's peak learning rate, cosine to 0) tune it.
        groups: library only: explicit groups ``[[0, 1], [2, 3]]`` for every layer, or one such list per
            layer (streaming path; see :mod:`gqa.convert.groups`).
        fsync: flush output files to disk before the rename (the benchmark uses it).

    Returns:
        The :class:`ConversionReport`, also written to ``out/conversion_report.json``.
    """
    from gqa.atomic import atomic_dir
    from gqa.provenance import utc_date, versions
    from gqa.units import dtype_name, parse_dtype

    t0 = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    # --- options, all checked before any file is read -------------------------------------------
    given = [
        n
        for n, v in (("--kv-heads", kv_heads), ("--kv-heads-per-layer", kv_heads_per_layer), ("--kv-budget", kv_budget))
        if v is not None
    ]
    if len(given) != 1:
        raise GQAUserError(
            "give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if kv_heads is not None:
        _int_option("--kv-heads", kv_heads)
    per_layer = _per_layer_spec(kv_heads_per_layer) if kv_heads_per_layer is not None else None
    if kv_budget is not None:
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) or not math.isfinite(kv_budget):
            raise GQAUserError(f"--kv-budget must be a fraction in (0, 1], got {kv_budget!r}")
        if not 0 < kv_budget <= 1:
            raise GQAUserError(f"--kv-budget must be a fraction in (0, 1], got {kv_budget!r}")
    _choice("--grouping", grouping, GROUPINGS)
    method = merge_method(merge)
    exp = export_for(export)
    out_dtype = parse_dtype(dtype, allowed=OUTPUT_DTYPES)
    check_seed(seed, "--seed")
    _int_option("--calib-tokens", calib_tokens)
    _int_option("seq_len", seq_len)
    if distill is not None:
        _choice("--distill", distill, DISTILL_METHODS)
        _int_option("--distill-steps", distill_steps)
        _choice("--distill-params", distill_params, DISTILL_PARAMS)
        _choice("--distill-inputs", distill_inputs, DISTILL_INPUTS)
        if isinstance(distill_lr, bool) or not isinstance(distill_lr, (int, float)) or not 0 < distill_lr < math.inf:
            raise GQAUserError(f"--distill-lr must be a positive number, got {distill_lr!r}; e.g. 3e-3")
    needs = [
        what
        for what, on in (
            ("--grouping similarity", grouping == "similarity"),
            (f"--merge {merge}", method.needs_calibration),
            ("--kv-budget", kv_budget is not None),
            ("--distill", distill is not None),
        )
        if on
    ]
    if needs and calib is None:
        raise GQAUserError(f"--calib TEXT is needed for {', '.join(needs)}; pass calibration text (a file or folder)")
    check_paths(src, out, force)
    if src.is_file() and src.suffix == ".gguf" and kv_heads is not None:
        _check_gguf_target(src, kv_heads)
    if src.is_dir():
        _check_source_folder(src)
    exp.check_source(src)
    # per-layer KV heads in the source (a per_layer_config folder, a "deci" GGUF): the streaming path reads
    # one Hkv for every layer, so these load into memory through gqa's own readers (the calibrated path)
    calibrated = calib is not None or not exp.streaming or _has_per_layer_heads(src)
    if calibrated and merge == "random":
        raise GQAUserError(
            "--merge random re-initializes heads, so calibration and alignment do nothing for it; drop --calib"
            if calib is not None
            else "--merge random works on the streaming path only (--export hf, no --calib, uniform KV heads); "
            "choose another --merge"
        )
    if calibrated and groups is not None:
        raise GQAUserError(
            "explicit groups are a streaming-path option (--export hf, no --calib, uniform KV heads); drop groups"
        )

    # --- run: one writer per OUT (a second run is refused here), leftovers of killed runs removed --------
    with atomic_dir(out, force=force, marker=REPORT_NAME) as tmp:
        if calibrated:
            from gqa.convert.calibrated.run import convert_calibrated

            report = convert_calibrated(
                src,
                tmp,
                kv_heads=kv_heads,
                kv_heads_per_layer=per_layer,
                kv_budget=kv_budget,
                grouping=grouping,
                merge=merge,
                calib=calib,
                calib_tokens=calib_tokens,
                seq_len=seq_len,
                export=exp,
                out_dtype=out_dtype,
                seed=seed,
                progress=progress,
                distill=distill,
                distill_steps=distill_steps,
                distill_params=distill_params,
                distill_inputs=distill_inputs,
                distill_lr=distill_lr,
            )
        else:
            report = _streaming_report(
                src, tmp, kv_heads, per_layer, groups, merge, out_dtype, seed, progress, fsync, dtype_name
            )
        report.source, report.output = str(src), str(out)
        report.seconds = round(time.perf_counter() - t0, 3)
        report.date = utc_date()
        report.versions = {k: v for k, v in versions().items() if v is not None}
        (tmp / REPORT_NAME).write_text(report.to_json())
    return report


def _has_per_layer_heads(src: Path) -> bool:
    """True when ``src`` (already checked to exist) declares a KV-head count per layer."""
    if src.is_dir():
        from gqa.hf_registry import read_per_layer_heads

        return read_per_layer_heads(src) is not None
    if src.suffix.lower() == ".gguf":
        from gqa.formats.gguf import gguf_file_architecture

        return gguf_file_architecture(src) == "deci"
    return False


def _check_source_folder(src: Path) -> None:
    """Cheap checks of a source folder, shared by both paths before anything is loaded: config.json,
    index file names (bare names inside SRC), every safetensors header, no pickle-only folders."""
    from gqa.convert.streaming import _safetensors_source

    _safetensors_source(src).close()  # parses headers only; reads no tensor data


def _streaming_report(src, tmp, kv_heads, per_layer, groups, merge, out_dtype, seed, progress, fsync, dtype_name):
    from gqa.convert.streaming import convert_streaming
    from gqa.units import kv_bytes_per_token

    res = convert_streaming(
        src,
        tmp,
        kv_heads=kv_heads,
        kv_heads_per_layer=per_layer,
        groups=groups,
        merge=merge,
        out_dtype=out_dtype,
        seed=seed,
        progress=progress,
        fsync=fsync,
    )
    s = res.shape
    before = [s.n_kv_heads] * s.n_layers
    return ConversionReport(
        source=str(src),
        output="",
        path="streaming",
        export="hf",
        model_type=res.config["model_type"],
        layout=res.layout,
        grouping=res.grouping,
        merge=merge,
        align=False,
        seed=seed,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        head_dim=s.head_dim,
        kv_heads_before=before,
        kv_heads_after=res.kv_heads_after,
        groups=res.groups,
        kv_cache_dtype=dtype_name(res.kv_dtype),
        kv_cache_bytes_per_token_before=kv_bytes_per_token(before, s.head_dim, res.kv_dtype),
        kv_cache_bytes_per_token_after=kv_bytes_per_token(res.kv_heads_after, s.head_dim, res.kv_dtype),
        parameters_before=res.parameters_before,
        parameters_after=res.parameters_after,
        parameters_removed=res.parameters_before - res.parameters_after,
        output_dtype=res.written_dtype,
    )
