"""Training: the shared loop (AdamW, warm-up + cosine, accumulation, distillation, checkpoints with exact
resume, DDP / FSDP2 under torchrun), pretraining from scratch and uptraining converted models."""

from gqa.model.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gqa.provenance import provenance, provenance_markdown
from gqa.train.config import TrainConfig
from gqa.train.loop import METRICS_NAME, SUMMARY_NAME, TrainResult, batch_offsets, train
from gqa.train.pretrain import REFERENCE_CONFIG, REFERENCE_TRAIN, pretrain, shipped_model_path
from gqa.train.uptrain import read_pretrain_tokens, uptrain, uptrain_defaults, uptrain_tokens

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "batch_offsets",
    "pretrain",
    "uptrain",
    "uptrain_tokens",
    "uptrain_defaults",
    "read_pretrain_tokens",
    "shipped_model_path",
    "REFERENCE_CONFIG",
    "REFERENCE_TRAIN",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "SUMMARY_NAME",
    "provenance",
    "provenance_markdown",
]
