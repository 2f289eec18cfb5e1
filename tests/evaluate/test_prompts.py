"""Greedy-continuation agreement on a prompt set (gqa eval --teacher --prompts)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gqa import GQAConfig, GQAForCausalLM, save_hf
from gqa.cli import app
from gqa.data import save_tokenizer, train_bpe_tokenizer
from gqa.errors import GQAUserError
from gqa.evaluate.prompts import greedy_agreement, load_prompts

TEXT = "the cat sat on the mat and the dog ran in the park " * 40


def _model(seed: int) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    return GQAForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXT, vocab_size=300)


class _Encoder:
    """The two calls greedy_agreement makes of a tokenizer, over a tokenizers.Tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids)


def test_a_model_agrees_with_itself_and_a_different_one_is_counted_token_by_token(tok):
    enc, prompts = _Encoder(tok), ["the cat", "the dog ran", "on the"]
    a, b = _model(0), _model(1)
    same = greedy_agreement(a, a, enc, prompts, new_tokens=6)
    assert (same.identical, same.prefix, same.prompts) == (1.0, 1.0, 3)
    other = greedy_agreement(a, b, enc, prompts, new_tokens=6)
    for row, p in zip(other.rows, prompts, strict=True):  # the common prefix, recomputed directly
        ids = enc.encode(p)
        x = a.generate_greedy(torch.tensor([ids]), 6)[0, len(ids) :].tolist()
        y = b.generate_greedy(torch.tensor([ids]), 6)[0, len(ids) :].tolist()
        assert row["common_tokens"] == next((i for i in range(6) if x[i] != y[i]), 6)
    assert other.prefix == sum(r["common_tokens"] for r in other.rows) / 18


def test_prompt_files_and_the_shipped_set(tmp_path):
    assert len(load_prompts("prompts:knowledge")) >= 30
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    for spec, needle in (("prompts:nope", "shipped: prompts:knowledge"), (str(tmp_path / "missing.txt"), "does not exist"),
                         (str(tmp_path / "bad.jsonl"), 'no "prompt" string')):  # fmt: skip
        with pytest.raises(GQAUserError, match=needle):
            load_prompts(spec)


def test_eval_command_reports_agreement_and_top1(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    save_hf(_model(0), tmp_path / "a", side_files_from=tmp_path / "tok")
    save_hf(_model(1), tmp_path / "b", side_files_from=tmp_path / "tok")
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "p.txt").write_text("the cat\nthe dog\n")
    args = ["eval", str(tmp_path / "a"), "--data", str(tmp_path / "text.txt"), "--max-tokens", "64"]
    res = CliRunner().invoke(app, [*args, "--teacher", str(tmp_path / "b"), "--prompts", str(tmp_path / "p.txt"),
                                   "--prompt-tokens", "4", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["prompts"]["prompts"] == 2 and 0 <= out["prompts"]["prefix"] <= 1
    assert 0 <= out["top1_agreement"] <= 1
    res = CliRunner().invoke(app, [*args, "--prompts", "prompts:knowledge"])
    assert res.exit_code == 2 and "pass --teacher too" in res.output
