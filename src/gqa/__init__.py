"""gqa: grouped-query attention — a fast, correct GQA layer and KV cache, and tools to convert,
uptrain, evaluate and serve checkpoints with fewer KV heads.

Head mapping everywhere: with Hq query heads and Hkv KV heads (g = Hq // Hkv), query head h uses
KV head h // g. Causal masks are aligned bottom-right.
"""

from gqa import hf_registry as _hf_registry  # noqa: F401  (AutoModelForCausalLM loads per-layer KV-head folders)
from gqa import masks
from gqa.cache import KVCache, ModelCache
from gqa.functional import attention, select_backend
from gqa.generation import generate
from gqa.layer import GroupedQueryAttention, RMSNorm
from gqa.model import GQAConfig, GQAForCausalLM, load_hf, save_hf
from gqa.reference import reference_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "select_backend",
    "reference_attention",
    "masks",
    "GroupedQueryAttention",
    "RMSNorm",
    "KVCache",
    "ModelCache",
    "GQAConfig",
    "GQAForCausalLM",
    "load_hf",
    "save_hf",
    "generate",
    "__version__",
]
