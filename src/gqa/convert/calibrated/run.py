"""The calibrated path of :func:`gqa.convert.convert`: load the model, calibrate, group, align, merge,
distil, export.

The model (a transformers Llama-family folder, a gqa ``checkpoint.pt`` or a GGUF file) is run on
calibration text through forward hooks (:mod:`gqa.convert.calibrated.stats`), reduced layer by layer
(:mod:`gqa.convert.calibrated.reduce`), optionally distilled layer by layer
(:mod:`gqa.convert.calibrated.distill`), and written by the export registry
(:mod:`gqa.convert.exports`).

Memory: a folder stored wholly in bf16 or fp16 is held in that dtype (a 7B model: 13.5 GB, not 27),
and every step computes in float32 one layer at a time (:mod:`gqa.convert.calibrated.placement`), so
the numbers are exactly those of a float32 copy; other sources are held in float32. The converted
model shares every tensor outside attention with the source model (only the rebuilt attention
weights are new, in float32), and each layer's calibration statistics are dropped once it is reduced.
The one exception: ``--merge lsq|fit`` gathers attention statistics for every layer at once; where
they would not fit in memory (a 7B model) the merge fits on input moments only
(:func:`_attention_sequences`). Options were validated by :func:`gqa.convert.convert`; the output goes
to the temporary folder it passes in. Query head h reads KV head h // (Hq // Hkv_layer) in the output.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from gqa.convert.calibrated.budget import budget_heads, choose_kv_heads
from gqa.convert.calibrated.placement import upcast_forward
from gqa.convert.calibrated.reduce import distilled_error_curves, error_curves, reduce_kv_heads
from gqa.convert.calibrated.stats import calibration_ids, collect_statistics
from gqa.convert.exports import side_files_folder
from gqa.convert.groups import check_kv_heads
from gqa.convert.report import ConversionReport
from gqa.errors import GQAUserError

__all__ = ["convert_calibrated", "source_dtype", "held_dtype"]


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files the model in ``folder`` loads from: those its index lists, else every
    ``*.safetensors`` (a stray file beside an index is not part of the model)."""
    from gqa.formats.transformers.safetensors import read_folder

    return sorted({info.file for shard in read_folder(folder) for info in shard})


def source_dtype(src: Path) -> torch.dtype:
    """The float dtype the source stores its attention weights in (GGUF and checkpoint.pt: float32)."""
    if src.is_dir():
        from gqa.formats.transformers.safetensors import read_header

        for f in _weight_files(src):
            for info in read_header(f)[0]:
                if info.dtype.is_floating_point and ".self_attn." in info.name:
                    return info.dtype
    return torch.float32


def held_dtype(src: Path) -> torch.dtype:
    """The dtype the calibrated path holds ``src``'s model in: the stored dtype of a folder whose
    floating tensors are all bf16 or all fp16 (an exact load, half the memory of float32), else
    float32 (GGUF, checkpoint.pt, float32 / float64 / mixed folders: as before)."""
    if src.is_dir():
        from gqa.formats.transformers.safetensors import read_header

        stored = {info.dtype for f in _weight_files(src) for info in read_header(f)[0] if info.dtype.is_floating_point}
        if len(stored) == 1 and stored <= {torch.bfloat16, torch.float16}:
            return stored.pop()
    return torch.float32


def _load(src: Path):
    """The model at ``src`` in :func:`held_dtype`; a one-line error for anything that is not a gqa family."""
    from gqa import families
    from gqa.model import GQAForCausalLM, load_model
    from gqa.progress import quiet_loading

    with quiet_loading():
        model = load_model(src, dtype=held_dtype(src))
    if not isinstance(model, GQAForCausalLM):
        raise GQAUserError(
            f"{src} is not a {'/'.join(families.names(calibrates=True))} model; the calibrated path (--calib, --export decilm/gguf) "
            "needs one of those (other families convert with --kv-heads and no --calib)"
        )
    return model


def _attention_sequences(merge: str, cfg, kv_heads: list[int]) -> tuple[int, str | None]:
    """How many calibration sequences gather attention statistics, and why none when they do not fit.

    ``lsq`` and ``fit`` use the attention-averaged input moments, ``[Hkv, d+1, d+1]`` float64 per layer
    held for every layer at once: 137 GB for a Llama-2-7B (32 layers x 32 KV heads x 4097^2 x 8 bytes).
    When they would take more than half the memory available, the merge fits on the plain input
    moments instead (still calibrated, a little less accurate), and the report says so.
    """
    if merge not in ("lsq", "fit"):
        return 0, None
    need = sum(kv_heads) * (cfg.d_model + 1) ** 2 * 8
    available = _available_memory()
    if available is not None and need > available // 2:
        return 0, (
            f"the attention statistics --merge {merge} uses would take {need / 2**30:.1f} GiB "
            f"(of {available / 2**30:.1f} GiB available); fitting on input moments only"
        )
    return 4, None


def _available_memory() -> int | None:
    """Bytes of memory available to this process (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tokenizer(src: Path):
    from gqa.model import load_model_tokenizer
    from gqa.progress import quiet_loading

    with quiet_loading():
        return load_model_tokenizer(src)


def convert_calibrated(
    src: Path,
    folder: Path,
    *,
    kv_heads: int | None,
    kv_heads_per_layer: list[int] | None,
    kv_budget: float | None,
    grouping: str,
    merge: str,
    calib: str | None,
    calib_tokens: int,
    seq_len: int,
    export,
    out_dtype: torch.dtype | None,
    seed: int,
    progress: bool,
    distill: str | None,
    distill_steps: int,
    distill_params: str,
    distill_inputs: str,
    distill_lr: float,
    distill_window: int = 1,
    budget_curves: str = "merged",
    kv_latent: int | None = None,
    latent_rope_dim: int = 16,
    latent_rope: str = "groups",
) -> ConversionReport:
    """Convert ``src`` into the temporary ``folder`` (options as checked by :class:`gqa.convert.ConvertOptions`).
    With ``kv_latent`` every layer's attention becomes a rank-``kv_latent`` latent one
    (:func:`gqa.convert.calibrated.latent.latent_model`) instead of losing KV heads."""
    from gqa.units import dtype_name, kv_bytes_per_token

    calib_text = None
    if calib is not None:
        from gqa.data import load_text

        calib_text = load_text(calib)  # a bad spec fails before the model is loaded
    written = out_dtype or source_dtype(src)
    model = _load(src)
    cfg = model.config
    before = cfg.kv_heads_per_layer
    per_layer = None
    if kv_heads is not None:
        for n_old in set(before):
            check_kv_heads(n_old, cfg.n_heads, kv_heads)
        per_layer = [kv_heads] * cfg.n_layers
    elif kv_heads_per_layer is not None:
        if len(kv_heads_per_layer) != cfg.n_layers:
            raise GQAUserError(
                f"--kv-heads-per-layer lists {len(kv_heads_per_layer)} layers; the model has {cfg.n_layers}"
            )
        for i, (n, old) in enumerate(zip(kv_heads_per_layer, before, strict=True)):
            check_kv_heads(old, cfg.n_heads, n, f"--kv-heads-per-layer (layer {i})")
        per_layer = list(kv_heads_per_layer)
    if kv_latent is not None:
        from gqa.convert.calibrated.latent import check_latent_target

        check_latent_target(cfg, kv_latent, latent_rope_dim, shared=latent_rope == "shared")  # before minutes of calibration
        per_layer = list(before)  # a latent layer keeps its KV groups (for their rotated keys)
    max_heads = budget_heads(kv_budget, before) if kv_budget is not None and kv_latent is None else None
    align = calib is not None
    stats, ids, attention_note = None, None, None
    if calib is not None:
        torch.manual_seed(seed)
        ids = calibration_ids(calib_text, _tokenizer(src), calib_tokens, seq_len)
        # A latent conversion reads the heads' attention offsets (the expected rotation of unrotated pairs).
        attention_sequences, attention_note = _attention_sequences("fit" if kv_latent else merge, cfg, before)
        if attention_note and progress:
            print(f"gqa convert: {attention_note}", file=sys.stderr)
        with upcast_forward(model, torch.float32):
            stats = collect_statistics(model, ids, attention_sequences=attention_sequences, progress=progress)
    curves = None
    if per_layer is None:
        if budget_curves == "distilled":
            settings = {"params": distill_params, "steps": distill_steps, "lr": distill_lr, "seed": seed}
            curves = distilled_error_curves(
                model, stats, ids, grouping=grouping, align=align, merge=merge, distill_settings=settings,
                progress=progress, compute_dtype=torch.float32,
            )  # fmt: skip
        else:
            curves = error_curves(
                model,
                stats,
                grouping=grouping,
                align=align,
                merge=merge,
                calib_ids=ids[:4],
                progress=progress,
                compute_dtype=torch.float32,
            )
        per_layer = choose_kv_heads(curves, max_heads)
    # The new model shares every tensor outside attention with ``model``: nothing below writes into
    # them (distillation trains only the new attention weights, the export reads).
    latent = None
    if kv_latent is not None:
        from gqa.convert.calibrated.latent import latent_model

        shared = latent_rope == "shared"
        ranks, curves = _latent_ranks(model, stats, ids, kv_latent, latent_rope_dim, shared, kv_budget, progress)
        new, fits = latent_model(model, stats, ranks, latent_rope_dim, shared_rope=shared)
        per_layer = new.config.kv_heads_per_layer  # rotated key heads: the groups', or one shared
        results = []
        latent = {
            "rank": kv_latent, "rope_dim": latent_rope_dim, "rope": latent_rope, "budget": kv_budget, "ranks": ranks,
            "layers": [dataclasses.asdict(f) for f in fits],
        }  # fmt: skip
    else:
        new, results = reduce_kv_heads(
            model,
            per_layer,
            stats,
            grouping=grouping,
            align=align,
            merge=merge,
            progress=progress,
            share_unchanged=True,
            compute_dtype=torch.float32,
            release_stats=True,
        )
    del stats
    distill_report = None
    if distill is not None:
        from gqa.convert.calibrated.distill import distill_local

        distill_report = distill_local(
            model,
            new,
            ids,
            params=distill_params,
            inputs=distill_inputs,
            steps=distill_steps,
            lr=distill_lr,
            window=distill_window,
            seed=seed,
            progress=progress,
        ).to_dict()
    del model
    with tempfile.TemporaryDirectory() as tok_dir:
        side = side_files_folder(src)
        if src.suffix.lower() == ".gguf":  # the tokenizer lives inside the GGUF file: save it to go along
            _tokenizer(src).save_pretrained(tok_dir)
            side = Path(tok_dir)
        export.write(new, folder, written, side, src)
    for name in ("auto_map",):  # never point a loader at code that was not copied
        _drop_config_key(folder / "config.json", name)
    d_head = cfg.resolved_head_dim
    n_before = sum(p.numel() for p in _params(cfg, before))
    n_after = sum(p.numel() for p in _params(cfg, per_layer))
    return ConversionReport(
        source=str(src),
        output="",
        path="calibrated",
        export=export.name,
        model_type=_model_type(cfg),
        layout="latent" if latent else "gqa",
        grouping=None if latent else grouping,
        merge=None if latent else merge,
        align=align,
        seed=seed,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        head_dim=d_head,
        kv_heads_before=before,
        kv_heads_after=per_layer,
        groups=[r.groups for r in results],
        kv_cache_dtype=dtype_name(written),
        kv_cache_bytes_per_token_before=kv_bytes_per_token(before, d_head, written),
        kv_cache_bytes_per_token_after=new.config.kv_bytes_per_token(written)
        if latent
        else kv_bytes_per_token(per_layer, d_head, written),
        parameters_before=n_before,
        parameters_after=n_after if not latent else new.config.num_parameters(),
        parameters_removed=n_before - (n_after if not latent else new.config.num_parameters()),
        output_dtype=dtype_name(written),
        calibration=None
        if calib is None
        else {
            "spec": str(calib),
            "tokens": calib_tokens,
            "seq_len": seq_len,
            **({"note": attention_note} if attention_note else {}),
        },
        kv_budget=kv_budget,
        layer_merges=[r.merge for r in results],
        layer_errors=[r.error for r in results],
        error_curves=None if curves is None else [{str(k): v for k, v in c.items()} for c in curves],
        distill=distill_report,
        latent=latent,
    )


def _latent_ranks(model, stats, ids, max_rank: int, rope_dim: int, shared: bool, budget: float | None, progress: bool):
    """Every layer's latent rank and the error curves behind them: ``max_rank`` everywhere, or with ``budget``
    the ranks (up to ``max_rank``) that minimise the summed measured error within ``budget`` of the original's
    cache values per token (``(ranks, curves or None)``)."""
    from gqa.convert.calibrated.latent import choose_latent_ranks, latent_error_curves

    cfg = model.config
    if budget is None:
        return [max_rank] * cfg.n_layers, None
    rope_values = rope_dim * (1 if shared else max(cfg.kv_heads_per_layer))
    allowed = int(budget * sum(2 * h * cfg.resolved_head_dim for h in cfg.kv_heads_per_layer) + 1e-9)
    with upcast_forward(model, torch.float32):
        curves = latent_error_curves(model, stats, max_rank, rope_dim, ids[:4], shared_rope=shared, progress=progress)
    return choose_latent_ranks(curves, rope_values, allowed), curves


def _params(cfg, heads: list[int]):
    """Parameter counts of a model with ``heads`` KV heads per layer (no allocation: meta tensors)."""
    import dataclasses

    from gqa.model import GQAForCausalLM

    with torch.device("meta"):
        model = GQAForCausalLM(dataclasses.replace(cfg, n_kv_heads=list(heads)))
    seen = set()
    for p in model.parameters():  # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _model_type(cfg) -> str:
    try:
        from gqa.model import config_to_hf

        return config_to_hf(cfg)["model_type"]
    except (ValueError, KeyError):
        return "gqa"


def _drop_config_key(path: Path, key: str) -> None:
    import json

    if path.is_file():
        cfg = json.loads(path.read_text())
        if isinstance(cfg, dict) and key in cfg:
            del cfg[key]
            path.write_text(json.dumps(cfg, indent=2) + "\n")
