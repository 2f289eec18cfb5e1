"""``--dtype`` on the commands that run a model: bf16 weights, activations and KV cache end to end."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import assert_one_line_refusal, gqa_cli

MHA = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"


def _ppl(tmp_path, *extra) -> dict:
    res = gqa_cli(["eval", MHA, "--max-tokens", "1024", "--json", *extra], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_eval_in_bfloat16_stays_near_float32(tmp_path):
    fp32, bf16 = _ppl(tmp_path), _ppl(tmp_path, "--dtype", "bfloat16")
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert bf16["perplexity"] != fp32["perplexity"]  # really computed in bf16
    assert abs(bf16["perplexity"] / fp32["perplexity"] - 1) < 0.01


def test_generate_in_bfloat16_and_bad_dtype(tmp_path):
    res = gqa_cli(["generate", MHA, "-p", "ROMEO:", "--max-new-tokens", "4", "--dtype", "bfloat16", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_one_line_refusal(gqa_cli(["eval", MHA, "--dtype", "fp8"], tmp_path), "unknown dtype 'fp8'")
