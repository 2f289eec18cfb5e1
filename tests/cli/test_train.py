"""gqa uptrain / eval / pretrain on the command line: a converted tiny model end to end, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gqa import GQAConfig, GQAForCausalLM, load_hf, save_hf
from gqa.cli import app
from gqa.data import save_tokenizer, train_bpe_tokenizer
from gqa.data.shakespeare import shakespeare_plays

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny MHA model with its BPE tokenizer, its GQA-1 conversion, and a small text file."""
    root = tmp_path_factory.mktemp("cli")
    text = shakespeare_plays()["macbeth"][:30_000]
    (root / "train.txt").write_text(text)
    tok = train_bpe_tokenizer(text, vocab_size=300)
    save_tokenizer(tok, root / "tok")
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64)
    save_hf(GQAForCausalLM(cfg), root / "mha", side_files_from=root / "tok")
    res = runner.invoke(app, ["convert", str(root / "mha"), str(root / "mqa"), "--kv-heads", "1"])
    assert res.exit_code == 0, res.output
    return root


def _uptrain(workdir, out, *extra):
    args = ["uptrain", str(workdir / "mqa"), str(out), "--data", str(workdir / "train.txt")]
    args += ["--val-data", str(workdir / "train.txt"), "--seq-len", "32", "--batch-size", "4", *extra]
    return runner.invoke(app, args)


def test_uptrain_then_eval_with_teacher(workdir):
    out = workdir / "up"
    res = _uptrain(workdir, out, "--tokens", "512", "--teacher", str(workdir / "mha"))
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 4 and summary["distilled"]
    got = summary["train_config"]  # with --teacher the defaults are the measured best distillation
    assert (got["train_params"], got["distill_alpha"], got["lr"]) == ("attention", 1.0, 1e-3)
    data = str(workdir / "train.txt")
    res = runner.invoke(
        app, ["eval", str(out), "--data", data, "--teacher", str(workdir / "mha"), "--seq-len", "32", "--json"]
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["tokens"] > 1000 and got["perplexity"] > 1 and got["kl"] > 0
    before = json.loads(
        runner.invoke(app, ["eval", str(workdir / "mqa"), "--data", data, "--seq-len", "32", "--json"]).output
    )
    assert got["tokens"] == before["tokens"]


def test_fraction_reads_no_pretraining_count_and_asks_for_it(workdir):
    res = _uptrain(workdir, workdir / "f", "--fraction", "0.05")
    assert res.exit_code == 2 and "--pretrain-tokens" in res.output
    res = _uptrain(workdir, workdir / "f", "--fraction", "0.05", "--pretrain-tokens", "5000")
    assert res.exit_code == 0, res.output
    assert json.loads((workdir / "f" / "training.json").read_text())["requested_tokens"] == 250


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fraction", "1.5", "--pretrain-tokens", "100"], "in (0, 1]"),
        (["--fraction", "0", "--pretrain-tokens", "100"], "in (0, 1]"),
        ([], "exactly one of --tokens"),
        (["--tokens", "64", "--seq-len", "100000"], "is past MODEL's context of 64 tokens"),
    ],
)
def test_uptrain_bad_input_is_one_line(workdir, extra, message):
    res = _uptrain(workdir, workdir / "bad", *extra)  # a later --seq-len overrides the helper's
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_uptrain_refuses_existing_out_bad_teacher_and_corrupt_checkpoint(workdir, tmp_path):
    (tmp_path / "taken").mkdir()
    res = _uptrain(workdir, tmp_path / "taken", "--tokens", "64")
    assert res.exit_code == 2 and "exists" in res.output
    other = tmp_path / "other"
    save_hf(
        GQAForCausalLM(GQAConfig(vocab_size=301, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64)), other
    )
    res = _uptrain(workdir, tmp_path / "t", "--tokens", "64", "--teacher", str(other))
    assert res.exit_code == 2 and "teacher vocabulary" in res.output
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = _uptrain(workdir, run, "--tokens", "64", "--resume")
    assert res.exit_code == 2 and "corrupt" in res.output
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    res = _uptrain(workdir, tmp_path / "fresh", "--tokens", "64", "--resume")
    assert res.exit_code == 2 and "nothing to resume; drop --resume" in res.output


def test_eval_bad_input(workdir, tmp_path):
    res = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "empty.txt").write_text("")
    res = runner.invoke(app, ["eval", str(workdir / "mha"), "--data", str(tmp_path / "empty.txt"), "--seq-len", "32"])
    assert res.exit_code == 2 and "empty" in res.output


def test_pretrain_tiny_run(tmp_path):
    out = tmp_path / "p"
    args = ["pretrain", str(out), "--data", "shakespeare:validation", "--val-data", "shakespeare:test"]
    args += ["--vocab-size", "300", "--d-model", "32", "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "4"]
    args += ["--ffn-dim", "64", "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--warmup", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "training.json").read_text())
    assert summary["kind"] == "pretrain" and summary["tokens"] == 3 * 2 * 32
    assert (out / "tokenizer.json").is_file()


def test_uptrain_time_budget_attention_only_with_holdout(workdir, tmp_path):
    """The project's recipe on the command line: distil end to end from the original, attention only, for a
    time budget, evaluating on a held-out slice of --data and keeping the best weights."""
    out = tmp_path / "budget"
    args = ["uptrain", str(workdir / "mqa"), str(out), "--data", str(workdir / "train.txt"), "--val-data", "holdout"]
    args += ["--seq-len", "32", "--batch-size", "4", "--teacher", str(workdir / "mha"), "--alpha", "1"]
    args += ["--train", "attention", "--max-minutes", "0.02", "--eval-every", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "stopped at the 0.02-minute budget" in " ".join(res.output.split())  # rich wraps long lines
    summary = json.loads((out / "training.json").read_text())
    assert summary["stopped_by_time"] and summary["train_config"]["train_params"] == "attention"
    assert summary["validation"]["tokens"] > 0
    trained, start = load_hf(out).state_dict(), load_hf(workdir / "mqa").state_dict()
    moved = {k for k in start if not torch.equal(trained[k], start[k])}
    assert moved and all(".attn." in k for k in moved)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tokens", "64", "--train", "mlp"], "--train must be one of"),
        (["--max-minutes", "0"], "--max-minutes must be a positive number"),
        (["--max-minutes", "nan"], "--max-minutes must be a positive number"),
    ],
)
def test_uptrain_budget_options_bad_input(workdir, extra, message):
    res = _uptrain(workdir, workdir / "bad-budget", *extra)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (workdir / "bad-budget").exists()


def test_uptrain_refuses_out_inside_the_model(workdir):
    before = sorted(p.name for p in (workdir / "mqa").iterdir())
    res = _uptrain(workdir, workdir / "mqa" / "sub", "--tokens", "64")
    assert res.exit_code == 2 and "overlaps MODEL" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in (workdir / "mqa").iterdir()) == before
