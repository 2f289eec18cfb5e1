"""gqa.train's loop: one host sync for the step's numbers per optimizer step, however many micro-batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import gqa.train.loop
from gqa import GQAConfig, GQAForCausalLM
from gqa.train import METRICS_NAME, TrainConfig, train

TRAIN_DIR = str(Path(gqa.train.loop.__file__).parent)
READS = ("item", "tolist", "__float__")  # the ways a float tensor's value reaches Python


def tiny_model(seed: int = 0) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    return GQAForCausalLM(cfg)


def count_reads(monkeypatch) -> list[str]:
    """Patch Tensor's value reads; the returned list grows by one name per read of a floating-point tensor
    made by code in gqa/train/ (torch's own reads, e.g. AdamW's step counter, are not the loop's)."""
    calls: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.is_floating_point() and sys._getframe(1).f_code.co_filename.startswith(TRAIN_DIR):
                calls.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


@pytest.mark.parametrize("distil", [False, True])
def test_one_sync_per_optimizer_step_with_grad_accum_4(tmp_path, monkeypatch, distil):
    ids = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=4, seq_len=16, batch_size=8, grad_accum=4, lr=3e-3, warmup_steps=1, checkpoint_every=0)
    teacher = tiny_model(seed=1) if distil else None
    calls = count_reads(monkeypatch)
    seen: list[int] = []  # reads so far at the end of each step
    train(tiny_model(), ids, tmp_path / "out", cfg, teacher=teacher, progress=False,
          on_step_end=lambda step, record: seen.append(len(calls)))  # fmt: skip
    per_step = [b - a for a, b in zip(seen, seen[1:], strict=False)]  # steps 2.. (step 1 also holds set-up)
    assert len(per_step) == cfg.steps - 1 and per_step == [1] * len(per_step), calls
    records = [json.loads(x) for x in (tmp_path / "out" / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and (r["kl"] is not None) == distil for r in records)
