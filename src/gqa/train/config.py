"""``TrainConfig``: every knob of a training run (pretraining or uptraining), saved with its checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from gqa.errors import GQAUserError
from gqa.units import check_seed

__all__ = ["TrainConfig", "TRAIN_PARAMS"]

#: Which parameters move: every one, the attention blocks' (Q, K, V, O and their norms), or K and V only.
TRAIN_PARAMS = ("all", "attention", "kv")


@dataclass
class TrainConfig:
    """One training run.

    batch_size is the *global* number of sequences per optimizer step, split into ``grad_accum``
    micro-steps and, under torchrun, across processes; so the same config gives the same update
    whatever the process count. ``steps`` optimizer steps see ``steps * batch_size * seq_len`` tokens.
    """

    steps: int = 100
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1  # on matrices only; norms and embeddings' gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    distill_alpha: float = 0.5  # with a teacher: loss = (1 - a) * LM + a * T^2 * KL(teacher_T || model_T)
    distill_temperature: float = 1.0
    eval_every: int = 0  # optimizer steps between validation evaluations (0: only at the end)
    eval_tokens: int = 20_000  # validation tokens per evaluation
    checkpoint_every: int = 50  # optimizer steps between checkpoints (0: none until the end)
    log_every: int = 1  # optimizer steps between metrics records
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16" or "none" to force
    fsdp: bool = False  # under torchrun: shard with FSDP2 (fully_shard) instead of DDP
    train_params: str = "all"  # "all", "attention" or "kv": which parameters the optimizer moves
    max_minutes: float = 0.0  # stop after this much training time (0: no time budget), see lr_at
    keep_best: bool = True  # with periodic evaluation: the output holds the best-evaluated weights

    def __post_init__(self):
        check_seed(self.seed, "--seed")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_tokens", "log_every"):
            if int(getattr(self, name)) < 1:
                raise GQAUserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise GQAUserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise GQAUserError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "pick grad_accum among its divisors"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GQAUserError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise GQAUserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise GQAUserError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise GQAUserError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.autocast not in ("auto", "bf16", "none"):
            raise GQAUserError(f"autocast must be 'auto', 'bf16' or 'none', got {self.autocast!r}")
        if self.train_params not in TRAIN_PARAMS:
            raise GQAUserError(f"--train must be one of {', '.join(TRAIN_PARAMS)}, got {self.train_params!r}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise GQAUserError(f"--max-minutes must be a positive number of minutes, got {self.max_minutes}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-step, over all processes."""
        return self.batch_size // self.grad_accum

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

        With a time budget (``max_minutes``), ``time_fraction`` is the share of it already used: the
        cosine follows whichever of steps and time is further along, so a run that stops at its time
        budget ends at the floor learning rate like a run that reaches its step count.
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, max((step - self.warmup_steps) / span, time_fraction))
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @classmethod
    def for_tokens(cls, tokens: int, **kwargs) -> TrainConfig:
        """A config whose ``steps`` cover at least ``tokens`` training tokens (rounded up to whole steps)."""
        probe = cls(**{**kwargs, "steps": 1})
        if tokens < 1:
            raise GQAUserError(f"tokens must be >= 1, got {tokens}")
        steps = max(1, math.ceil(tokens / probe.tokens_per_step))
        return cls(**{**kwargs, "steps": steps})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
