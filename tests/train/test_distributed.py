"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 runs match one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gqa import load_hf
from gqa.train import SUMMARY_NAME, train

# The same model, data and settings in every process; the config's batch is global.
WORKER = textwrap.dedent(
    """
    import sys, torch
    from gqa import GQAConfig, GQAForCausalLM
    from gqa.train import TrainConfig, train

    def setup(fsdp=False):
        torch.manual_seed(0)
        cfg = GQAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
        model = GQAForCausalLM(cfg)
        ids = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
        tcfg = TrainConfig(steps=4, seq_len=16, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=1,
                           checkpoint_every=2, eval_tokens=100, fsdp=fsdp)
        return model, ids, tcfg

    if __name__ == "__main__":
        torch.set_num_threads(1)
        model, ids, tcfg = setup(fsdp=sys.argv[2] == "fsdp")
        train(model, ids, sys.argv[1], tcfg, val_ids=ids[:200], progress=False)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(script), str(tmp_path / "two"), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sys.path.insert(0, str(tmp_path))
    try:
        import worker  # the script above, for the single-process run

        model, ids, tcfg = worker.setup()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker", None)
    one = train(model, ids, tmp_path / "one", tcfg, val_ids=ids[:200], progress=False)

    two = json.loads((tmp_path / "two" / SUMMARY_NAME).read_text())
    assert two["processes"] == 2
    assert two["final_loss"] == pytest.approx(one.final_loss, rel=1e-5)
    w_one, w_two = load_hf(tmp_path / "one").state_dict(), load_hf(tmp_path / "two").state_dict()
    for name, t in w_one.items():
        torch.testing.assert_close(w_two[name], t, rtol=1e-4, atol=1e-6, msg=name)
