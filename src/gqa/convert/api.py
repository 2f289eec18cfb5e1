"""``gqa.convert.convert``: the one entry point of the converter (``gqa convert`` calls it).

Its options are one :class:`~gqa.convert.options.ConvertOptions` (checked when built, before any file
is read); it then checks the paths and the source's metadata, and routes:

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

import time
from pathlib import Path

from gqa.convert.options import (
    DISTILL_INPUTS,
    DISTILL_PARAMS,
    GROUPINGS,
    OUTPUT_DTYPES,
    ConvertOptions,
)
from gqa.convert.report import REPORT_NAME, ConversionReport
from gqa.errors import GQAUserError

__all__ = [
    "convert",
    "ConvertOptions",
    "OUTPUT_DTYPES",
    "GROUPINGS",
    "DISTILL_PARAMS",
    "DISTILL_INPUTS",
    "check_paths",
]


def convert(src: str | Path, out: str | Path, *, options: ConvertOptions | None = None, **kwargs) -> ConversionReport:
    """Convert the checkpoint at ``src`` to other KV-head counts and write it to ``out``.

    Args:
        src: a transformers model folder (``config.json`` + safetensors, sharded or not) or a GGUF
            file; the calibrated path also reads a gqa ``checkpoint.pt``.
        out: the output folder, built under ``.OUT.partial-*`` beside it and renamed at the end.
        options: a :class:`ConvertOptions` (already validated).
        **kwargs: the fields of :class:`ConvertOptions` (``kv_heads=2, merge="mean", ...``); with
            ``options`` too, they replace its fields.

    Every option is checked before any file is read; then the paths and the source's cheap metadata,
    then the conversion runs into a temporary folder that is renamed to ``out`` at the end.

    Returns:
        The :class:`ConversionReport`, also written to ``out/conversion_report.json``.
    """
    from gqa.atomic import atomic_dir

    t0 = time.perf_counter()
    opts = _options(options, kwargs)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    _check_source(src, out, opts)
    calibrated = _is_calibrated(src, opts)
    # one writer per OUT (a second run is refused here), leftovers of killed runs removed
    with atomic_dir(out, force=opts.force, marker=REPORT_NAME) as tmp:
        report = _convert_calibrated(src, tmp, opts) if calibrated else _streaming_report(src, tmp, opts)
        _finish_report(report, src, out, t0)
        (tmp / REPORT_NAME).write_text(report.to_json())
    return report


def _options(options: ConvertOptions | None, kwargs: dict) -> ConvertOptions:
    """The one :class:`ConvertOptions` of a call: built from ``kwargs``, or ``options`` with ``kwargs`` replaced."""
    if options is None:
        return ConvertOptions(**kwargs)
    if not isinstance(options, ConvertOptions):
        raise TypeError(f"options must be a ConvertOptions, got {type(options).__name__}")
    return options.with_changes(**kwargs) if kwargs else options


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


def _check_source(src: Path, out: Path, opts: ConvertOptions) -> None:
    """The paths, then the source's cheap metadata (headers only, no tensor data) against the options."""
    check_paths(src, out, opts.force)
    if src.is_file() and src.suffix == ".gguf" and opts.kv_heads is not None:
        _check_gguf_target(src, opts.kv_heads)
    if src.is_dir():
        _check_source_folder(src)
    opts.export_spec.check_source(src)


def _is_calibrated(src: Path, opts: ConvertOptions) -> bool:
    """Whether the model is loaded into memory (the calibrated path) rather than streamed. Per-layer KV heads
    in the source (a per_layer_config folder, a "deci" GGUF) load too: the streaming path reads one Hkv."""
    calibrated = opts.calib is not None or not opts.export_spec.streaming or _has_per_layer_heads(src)
    if calibrated:
        opts.check_calibrated_path()
    return calibrated


def _convert_calibrated(src: Path, tmp: Path, opts: ConvertOptions) -> ConversionReport:
    from gqa.convert.calibrated.run import convert_calibrated

    return convert_calibrated(
        src,
        tmp,
        kv_heads=opts.kv_heads,
        kv_heads_per_layer=opts.per_layer,
        kv_budget=opts.kv_budget,
        grouping=opts.grouping,
        merge=opts.merge,
        calib=opts.calib,
        calib_tokens=opts.calib_tokens,
        seq_len=opts.seq_len,
        export=opts.export_spec,
        out_dtype=opts.out_dtype,
        seed=opts.seed,
        progress=opts.progress,
        distill=opts.distill,
        distill_steps=opts.distill_steps,
        distill_params=opts.distill_params,
        distill_inputs=opts.distill_inputs,
        distill_lr=opts.distill_lr,
        distill_window=opts.distill_window,
        budget_curves=opts.budget_curves,
        kv_latent=opts.kv_latent,
        latent_rope_dim=opts.latent_rope_dim,
        latent_rope=opts.latent_rope,
    )


def _finish_report(report: ConversionReport, src: Path, out: Path, t0: float) -> None:
    """What every report records beside the conversion: paths, seconds, date, package versions."""
    from gqa.provenance import utc_date, versions

    report.source, report.output = str(src), str(out)
    report.seconds = round(time.perf_counter() - t0, 3)
    report.date = utc_date()
    report.versions = {k: v for k, v in versions().items() if v is not None}


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


def _streaming_report(src: Path, tmp: Path, opts: ConvertOptions) -> ConversionReport:
    from gqa.convert.streaming import convert_streaming
    from gqa.units import dtype_name, kv_bytes_per_token

    merge, seed = opts.merge, opts.seed
    res = convert_streaming(
        src,
        tmp,
        kv_heads=opts.kv_heads,
        kv_heads_per_layer=opts.per_layer,
        groups=opts.groups,
        merge=merge,
        out_dtype=opts.out_dtype,
        seed=seed,
        progress=opts.progress,
        fsync=opts.fsync,
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
