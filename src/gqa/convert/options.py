"""``ConvertOptions``: every option of :func:`gqa.convert.convert`, checked once, in one place.

Each field carries its help text and, when ``gqa convert`` offers it, its command-line flag in
``dataclasses.field(metadata=...)``: the command line is built from these fields
(:func:`gqa.cli.convert.register`), never declared a second time. Fields without a flag
(``seq_len``, ``progress``, ``groups``, ``fsync``) are library options.

Building a :class:`ConvertOptions` validates it: a bad option, or a combination that cannot work,
is a one-line :class:`gqa.errors.GQAUserError` before any file is read. Checks that need the source
(its head counts, whether it loads into memory) run in :func:`gqa.convert.convert`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from gqa.convert.exports import export_for
from gqa.convert.merge import merge_method
from gqa.errors import GQAUserError
from gqa.units import check_seed, parse_dtype

__all__ = [
    "ConvertOptions",
    "cli_fields",
    "OUTPUT_DTYPES",
    "GROUPINGS",
    "DISTILL_METHODS",
    "DISTILL_PARAMS",
    "DISTILL_INPUTS",
]

OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
GROUPINGS = ("contiguous", "similarity")
DISTILL_METHODS = ("local", "none")
DISTILL_PARAMS = ("kv", "qkvo", "qkvo-mlp")
DISTILL_INPUTS = ("original", "converted")
BUDGET_CURVES = ("merged", "distilled")  # --budget-curves: errors after merging, or after local distillation too
LATENT_EXPORTS = ("gqa", "hf", "gguf")  # hf and gguf: DeepSeek-V2's layout (gqa.formats.deepseek2)
LATENT_ROPE = ("groups", "shared")  # --latent-rope: rotated key dims per KV group, or one head for all (DeepSeek-V2)

#: The KV-head targets, exactly one of which a conversion takes.
TARGETS = (("kv_heads", "--kv-heads"), ("kv_heads_per_layer", "--kv-heads-per-layer"), ("kv_budget", "--kv-budget"))
# (--kv-latent is the fourth, alternative target: a latent cache instead of fewer heads.)


def _option(default: Any, flag: str | None, help: str, cli_type: type | None = None) -> Any:
    """A dataclass field with its help text and its ``gqa convert`` flag (None: a library option only).
    ``cli_type``: the type the command line parses, where the field's annotation allows several."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "cli_type": cli_type})


def _int_option(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GQAUserError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise GQAUserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


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


@dataclass(frozen=True)
class ConvertOptions:
    """The options of one conversion (see :func:`gqa.convert.convert`); validated when built.

    Give exactly one target: ``kv_heads``, ``kv_heads_per_layer``, ``kv_budget`` or ``kv_latent`` (a low-rank
    latent KV cache of that rank instead of fewer heads, :mod:`gqa.convert.calibrated.latent`). A count that divides
    the checkpoint's Hkv merges equal groups; a multiple of Hkv that divides Hq replicates heads (exact:
    new head j = old head j // r). ``kv_budget`` chooses per-layer counts by dynamic programming over
    measured error curves. ``merge`` is a name in :data:`gqa.convert.merge.MERGES` (``mean`` / ``first``
    / ``random`` stream; ``weighted`` / ``lsq`` / ``fit`` need ``calib``); ``export`` a name in
    :data:`gqa.convert.exports.EXPORTS`; ``calib`` is read by :func:`gqa.data.load_text` and also aligns
    each group's heads (exact rotations folded into Q/K/V/O) before merging. ``dtype`` None keeps the
    source's dtype (GGUF input is dequantized to float32). ``groups`` (library only): explicit groups
    ``[[0, 1], [2, 3]]`` for every layer, or one such list per layer (streaming path; see
    :mod:`gqa.convert.groups`). Each field's metadata holds its help text and command-line flag.

    ``merge``, ``grouping`` and ``distill`` left None take :meth:`recipe_defaults`: with ``calib`` the best
    measured recipe (similarity, aligned, fit, local distillation), without it the paper's streaming
    mean-pool; ``distill="none"`` turns distillation off. The built object holds the values in effect.
    """

    kv_heads: int | None = _option(
        None,
        "--kv-heads",
        "New KV heads in every layer: a divisor of the current number (merge) or a multiple of it "
        "dividing the query heads (replicate heads, exact).",
    )
    kv_heads_per_layer: str | list[int] | None = _option(
        None, "--kv-heads-per-layer", "KV heads per layer, e.g. 4,4,2,... (each as for --kv-heads).", cli_type=str
    )
    kv_budget: float | None = _option(
        None,
        "--kv-budget",
        "Fraction of the original KV-cache bytes; per-layer heads (with --kv-latent: ranks) chosen to fit (needs --calib).",
    )
    kv_latent: int | None = _option(
        None,
        "--kv-latent",
        "Instead of fewer heads: a low-rank latent KV cache of rank R shared by all heads (MLA-style; needs "
        "--calib; written as --export gqa). A token then takes R + Hkv x --latent-rope-dim values per layer. With "
        "--kv-budget F: per-layer ranks up to R, chosen from measured error curves to fit F of the original's cache.",
    )
    latent_rope_dim: int = _option(
        16, "--latent-rope-dim", "Key dims each KV group keeps rotated (RoPE) with --kv-latent: an even number."
    )
    latent_rope: str = _option(
        "groups",
        "--latent-rope",
        "With --kv-latent: groups (each KV group keeps its own rotated key dims, its best-scoring pairs) or "
        "shared (one rotated key head for all heads at evenly spaced frequencies, the groups' keys merged: "
        "DeepSeek-V2's layout, which --export hf and gguf write). A token takes R + --latent-rope-dim values.",
        cli_type=str,
    )
    merge: str | None = _option(
        None,
        "--merge",
        "How a group's K/V heads are pooled: mean (the GQA paper), first, random; with --calib also "
        "weighted, lsq, or fit (the best measured of mean, weighted and lsq per layer). "
        "Default: fit with --calib, else mean.",
        cli_type=str,
    )
    grouping: str | None = _option(
        None,
        "--grouping",
        "Which heads share: contiguous (neighbours) or similarity (needs --calib). "
        "Default: similarity with --calib, else contiguous.",
        cli_type=str,
    )
    calib: str | None = _option(
        None,
        "--calib",
        "Calibration text (a file, a folder, english:calib, ...). With it the defaults are the best measured "
        "recipe: similarity grouping, aligned heads, fit merge, local distillation.",
    )
    calib_tokens: int = _option(65536, "--calib-tokens", "Calibration tokens to run.")
    distill: str | None = _option(
        None,
        "--distill",
        "local: fit each reduced attention layer to the original on the calibration text; none: do not. "
        "Default: local with --calib and --kv-heads / --kv-heads-per-layer / --kv-budget, else none.",
        cli_type=str,
    )
    distill_steps: int = _option(150, "--distill-steps", "Adam steps per layer for --distill.")
    distill_params: str = _option(
        "qkvo",
        "--distill-params",
        "What --distill fits: qkvo (Q, K, V and O), kv (K and V only) or qkvo-mlp (Q, K, V, O and the "
        "layer's MLP, matching the residual stream leaving the block).",
    )
    distill_inputs: str = _option(
        "converted",
        "--distill-inputs",
        "Layer inputs for --distill: converted (the new model's own, which also corrects the drift of "
        "earlier layers) or original (the source model's).",
    )
    distill_lr: float = _option(3e-3, "--distill-lr", "Adam's peak learning rate for --distill.")
    distill_window: int = _option(
        1,
        "--distill-window",
        "Consecutive layers --distill fits together, matching the residual stream leaving them (1: each "
        "layer alone; 2-4: blockwise windows, where a later layer can repair an earlier one's error).",
    )
    budget_curves: str = _option(
        "merged",
        "--budget-curves",
        "With --kv-budget: the per-layer errors the budget is spent by: merged (each layer's error after merging) "
        "or distilled (after local distillation too, so heads go where distillation cannot recover; one more "
        "distillation pass per head count).",
    )
    export: str | None = _option(
        None,
        "--export",
        "Output layout: hf (transformers; the default), decilm (block_configs), gguf (llama.cpp; needs SRC's "
        "tokenizer), gqa (gqa's checkpoint.pt; the default and only layout of --kv-latent).",
        cli_type=str,
    )
    dtype: str | torch.dtype | None = _option(
        None, "--dtype", "Output dtype: float32, bfloat16 or float16 (default: as the source).", cli_type=str
    )
    seed: int = _option(0, "--seed", "Seed for --merge random and --distill.")
    force: bool = _option(
        False, "--force", "Replace OUT if gqa convert wrote it (its conversion_report.json is there)."
    )
    seq_len: int = _option(256, None, "Calibration sequence length (calib_tokens run in sequences of seq_len).")
    progress: bool = _option(True, None, "Show progress bars.")
    groups: Any = _option(None, None, "Explicit groups for every layer, or one list per layer (streaming path).")
    fsync: bool = _option(False, None, "Flush output files to disk before the rename (the benchmark uses it).")

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        object.__setattr__(self, "_given", given)
        for name, value in self.recipe_defaults().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.distill == "none":
            object.__setattr__(self, "distill", None)
        self.validate()

    def recipe_defaults(self) -> dict[str, str | None]:
        """The values ``merge``, ``grouping`` and ``distill`` take when not given: with calibration text the
        best measured recipe (similarity grouping, aligned heads, the fit merge, local distillation; a latent
        target distils only when asked), without it the streaming path's (contiguous neighbours, mean pool,
        no distillation). See docs/results/recover-quality.md."""
        if self.calib is None:
            return {"grouping": "contiguous", "merge": "mean", "distill": None}
        return {"grouping": "similarity", "merge": "fit", "distill": None if self.kv_latent is not None else "local"}

    def with_changes(self, **changes) -> ConvertOptions:
        """These options with ``changes`` applied, as if built with them: a default that depends on another
        option (:meth:`recipe_defaults`) follows the new value (``dataclasses.replace`` would keep the old)."""
        return ConvertOptions(**{**self._given, **changes})

    # --- derived values (each a checked option) ------------------------------------------------------
    @property
    def per_layer(self) -> list[int] | None:
        """``kv_heads_per_layer`` as a list of ints, or None."""
        return None if self.kv_heads_per_layer is None else _per_layer_spec(self.kv_heads_per_layer)

    @property
    def merge_spec(self):
        """The :data:`gqa.convert.merge.MERGES` entry named by ``merge``."""
        return merge_method(self.merge)

    @property
    def export_name(self) -> str:
        """``export``, or its default: gqa for a latent conversion, else hf."""
        return self.export if self.export is not None else ("gqa" if self.kv_latent is not None else "hf")

    @property
    def export_spec(self):
        """The :data:`gqa.convert.exports.EXPORTS` entry named by ``export`` (or its default)."""
        return export_for(self.export_name)

    @property
    def out_dtype(self) -> torch.dtype | None:
        """The output dtype, or None to keep the source's."""
        return parse_dtype(self.dtype, allowed=OUTPUT_DTYPES)

    # --- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every check that needs no file: a one-line :class:`GQAUserError` for the first bad option."""
        self._check_target()
        _choice("--grouping", self.grouping, GROUPINGS)
        merge_method(self.merge)  # each of these three raises on a bad name
        export_for(self.export_name)
        parse_dtype(self.dtype, allowed=OUTPUT_DTYPES)
        check_seed(self.seed, "--seed")
        _int_option("--calib-tokens", self.calib_tokens)
        _int_option("seq_len", self.seq_len)
        if self.distill is not None:
            self._check_distill()
        self._check_budget_curves()
        self._check_calibration()
        if self.calib is not None or not self.export_spec.streaming:
            self.check_calibrated_path()

    def _check_target(self) -> None:
        given = [flag for name, flag in TARGETS if getattr(self, name) is not None]
        if self.kv_latent is not None:
            self._check_latent(given)
            return
        if len(given) != 1:
            raise GQAUserError(
                "give exactly one of --kv-heads, --kv-heads-per-layer, --kv-budget or --kv-latent"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.kv_heads is not None:
            _int_option("--kv-heads", self.kv_heads)
        if self.kv_heads_per_layer is not None:
            _per_layer_spec(self.kv_heads_per_layer)
        budget = self.kv_budget
        if budget is not None and (not _number(budget) or not math.isfinite(budget) or not 0 < budget <= 1):
            raise GQAUserError(f"--kv-budget must be a fraction in (0, 1], got {budget!r}")

    def _check_latent(self, given: list[str]) -> None:
        heads = [flag for flag in given if flag != "--kv-budget"]  # a budget picks the latent's per-layer ranks
        if heads:
            raise GQAUserError(f"--kv-latent replaces the KV heads by a latent: drop {', '.join(heads)}")
        _int_option("--kv-latent", self.kv_latent)
        budget = self.kv_budget
        if budget is not None and (not _number(budget) or not math.isfinite(budget) or not 0 < budget <= 1):
            raise GQAUserError(f"--kv-budget must be a fraction in (0, 1], got {budget!r}")
        if budget is not None and self.export_name != "gqa":
            raise GQAUserError(
                f"--kv-budget gives a latent per-layer ranks, which DeepSeek-V2's files (--export {self.export_name}) "
                "cannot hold; use --export gqa, or one rank (drop --kv-budget)"
            )
        _choice("--latent-rope", self.latent_rope, LATENT_ROPE)
        if (
            isinstance(self.latent_rope_dim, bool)
            or not isinstance(self.latent_rope_dim, int)
            or self.latent_rope_dim < 0
            or self.latent_rope_dim % 2
        ):
            raise GQAUserError(
                f"--latent-rope-dim must be an even whole number >= 0, got {self.latent_rope_dim!r}; e.g. 16"
            )
        if self.export_name not in LATENT_EXPORTS:
            raise GQAUserError(
                f"--export {self.export_name} cannot hold a latent KV cache; use --export gqa (the default with "
                "--kv-latent), or hf / gguf (DeepSeek-V2's layout) with --latent-rope shared"
            )
        if self.export_name != "gqa" and self.latent_rope != "shared":
            raise GQAUserError(
                f"--export {self.export_name} writes DeepSeek-V2's latent layout, which has one rotated key head: "
                "add --latent-rope shared (or use --export gqa)"
            )
        if self.calib is None:
            raise GQAUserError("--kv-latent needs --calib TEXT: the latent is fitted to calibration activations")

    def _check_distill(self) -> None:
        _choice("--distill", self.distill, DISTILL_METHODS)
        _int_option("--distill-steps", self.distill_steps)
        _int_option("--distill-window", self.distill_window)
        _choice("--distill-params", self.distill_params, DISTILL_PARAMS)
        _choice("--distill-inputs", self.distill_inputs, DISTILL_INPUTS)
        if not _number(self.distill_lr) or not 0 < self.distill_lr < math.inf:
            raise GQAUserError(f"--distill-lr must be a positive number, got {self.distill_lr!r}; e.g. 3e-3")

    def _check_budget_curves(self) -> None:
        _choice("--budget-curves", self.budget_curves, BUDGET_CURVES)
        if self.budget_curves == "merged":
            return
        if self.kv_budget is None or self.kv_latent is not None:
            raise GQAUserError(
                "--budget-curves distilled chooses KV heads per layer: it needs --kv-budget F (and no --kv-latent)"
            )
        if self.distill is None:
            raise GQAUserError(
                "--budget-curves distilled measures layers after local distillation: drop --distill none"
            )

    def _check_calibration(self) -> None:
        needs = [
            what
            for what, on in (
                ("--grouping similarity", self.grouping == "similarity"),
                (f"--merge {self.merge}", self.merge_spec.needs_calibration),
                ("--kv-budget", self.kv_budget is not None),
                ("--distill", self.distill is not None),
            )
            if on
        ]
        if needs and self.calib is None:
            raise GQAUserError(
                f"--calib TEXT is needed for {', '.join(needs)}; pass calibration text (a file or folder)"
            )
        if self.distill is not None:
            from gqa.convert.calibrated.distill import min_sequences

            need = min_sequences() * self.seq_len
            if self.calib_tokens < need:
                raise GQAUserError(
                    f"--distill {self.distill}{'' if self._given['distill'] else ' (the default with --calib)'} "
                    f"needs at least {need:,} calibration tokens ({min_sequences()} "
                    f"sequences of --seq-len {self.seq_len}: a training and a held-out slice), got "
                    f"--calib-tokens {self.calib_tokens:,}; pass --calib-tokens {need} or more"
                    + ("" if self._given["distill"] else ", or --distill none")
                )

    def check_calibrated_path(self) -> None:
        """The options that only the streaming path takes, refused when the conversion is calibrated
        (``calib`` given, an export that needs the model in memory, or a source with per-layer heads)."""
        if self.merge == "random":
            raise GQAUserError(
                "--merge random re-initializes heads, so calibration and alignment do nothing for it; drop --calib"
                if self.calib is not None
                else "--merge random works on the streaming path only (--export hf, no --calib, uniform KV "
                "heads); choose another --merge"
            )
        if self.groups is not None:
            raise GQAUserError(
                "explicit groups are a streaming-path option (--export hf, no --calib, uniform KV heads); drop groups"
            )


def cli_fields() -> list[dataclasses.Field]:
    """The fields ``gqa convert`` offers as options, in the order its help lists them."""
    return [f for f in dataclasses.fields(ConvertOptions) if f.metadata.get("flag")]
