"""The one report a conversion writes: :class:`ConversionReport`, saved as ``OUT/conversion_report.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["ConversionReport", "REPORT_NAME"]

REPORT_NAME = "conversion_report.json"


@dataclass
class ConversionReport:
    """What a conversion did, for either path.

    kv_heads_before / kv_heads_after: KV heads per layer. groups[i][j]: the old KV heads of layer i
    that form new KV head j (one head listed several times when heads are replicated). Query head h
    of layer i reads KV head h // (Hq // kv_heads_after[i]). layer_merges / layer_errors (calibrated
    path): the merge used per layer (``fit`` resolves to one of mean, weighted, lsq) and the measured
    attention-output error relative to the residual energy (0 when nothing was merged).
    kv_cache_dtype: the dtype of the K/V projections actually written (what a KV cache is computed in).
    """

    source: str
    output: str
    path: str  # "streaming" (tensor by tensor) or "calibrated" (model loaded, calibration text run)
    export: str
    model_type: str
    layout: str
    grouping: str | None
    merge: str | None
    align: bool
    seed: int
    n_layers: int
    n_heads: int
    head_dim: int
    kv_heads_before: list[int]
    kv_heads_after: list[int]
    groups: list[list[list[int]]]
    kv_cache_dtype: str
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    parameters_before: int
    parameters_after: int
    parameters_removed: int
    output_dtype: str
    calibration: dict | None = None  # {"spec", "tokens", "seq_len"}
    kv_budget: float | None = None
    layer_merges: list[str] | None = None
    layer_errors: list[float | None] | None = None
    error_curves: list[dict[str, float]] | None = None
    distill: dict | None = None  # DistillReport.to_dict() of --distill local
    latent: dict | None = None  # --kv-latent: rank, rope_dim and per layer the kept pairs and energy (LatentFit)
    seconds: float = 0.0
    date: str = ""
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> ConversionReport:
        return cls(**d)
