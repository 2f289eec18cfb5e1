"""Bad input the real commands must answer with one line and exit code 2 (reliability issue, round three):
seeds past what torch takes, absurd thread counts, a full disk, validation text nobody asked for, and a
local file shadowed by a built-in corpus name."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gqa.cli.common import user_message
from gqa.data.text import held_out_spec
from gqa.model.assets import shipped_model_path
from helpers import assert_one_line_refusal, gqa_cli

TOO_BIG = str(2**64)


@pytest.fixture
def work(tmp_path) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "my.txt"
    path.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 300))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "{model}", "-p", "a", "--temperature", "1", "--seed", TOO_BIG],
        ["convert", "{model}", "out", "--kv-heads", "2", "--merge", "random", "--seed", TOO_BIG],
        ["uptrain", "{model}", "out", "--data", "{text}", "--tokens", "100", "--seed", TOO_BIG],
        ["pretrain", "out", "--data", "{text}", "--seed", TOO_BIG],
        ["convert", "{model}", "out", "--kv-heads", "2", "--seed", "-1"],
    ],
    ids=["generate", "convert", "uptrain", "pretrain", "negative"],
)
def test_seeds_torch_cannot_take_are_one_line(args, work, text):
    args = [a.format(model=shipped_model_path(), text=text) for a in args]
    res = gqa_cli(args, work)
    assert_one_line_refusal(res, "0 .. 2^64 - 1")
    assert list(work.iterdir()) == []


def test_the_largest_seed_samples_every_prompt(work):
    """Prompt i is seeded with seed + i, which must wrap at 2^64 rather than overflow."""
    args = ["generate", shipped_model_path(), "-p", "a", "-p", "b", "--temperature", "1", "--max-new-tokens", "3"]
    res = gqa_cli([*args, "--seed", str(2**64 - 1)], work)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("threads", ["100000", "0", "-3"])
@pytest.mark.parametrize("bench", ["cpu-decode", "attention"])
def test_absurd_thread_counts_are_refused_before_anything_runs(bench, threads, work):
    """--threads 100000 used to crash OpenMP (SIGSEGV) in `gqa bench cpu-decode`."""
    res = gqa_cli(["bench", bench, "--threads", threads, "--out", "out"], work, timeout=60)
    assert_one_line_refusal(res, "--threads must be a whole number in 1 ..")
    assert list(work.iterdir()) == []


def _disk_full_errors():
    """The shapes in which the writers gqa uses report a full disk."""
    from safetensors import SafetensorError

    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    wrapped.__context__ = RuntimeError("basic_ios::clear: iostream error")
    nested = RuntimeError("saving failed")
    nested.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    return [
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError("98304 requested and 61880 written"),
        wrapped,
        nested,
        OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors"),
    ]


@pytest.mark.parametrize("error", _disk_full_errors(), ids=["safetensors", "short", "torch", "nested", "oserror"])
def test_a_full_disk_is_one_line_whatever_the_writer(error):
    message = user_message(error)
    assert message is not None and "\n" not in message and "free some disk space" in message


def test_a_bug_is_not_mistaken_for_a_full_disk():
    assert user_message(RuntimeError("unexpected pos in my own code")) is None
    assert user_message(KeyError("written")) is None


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{model}", "{disk}/out", "--kv-heads", "2", "--calib", "{text}", "--calib-tokens", "2048",
         "--distill", "none"],  # a full disk at the write; distilling first would only take longer
        ["convert", "{model}", "{disk}/out.gguf", "--kv-heads", "2", "--export", "gguf"],
        ["uptrain", "{model}", "{disk}/out", "--data", "{text}", "--tokens", "500", "--seq-len", "32"],
    ],
    ids=["calibrated", "gguf", "uptrain"],
)
def test_a_full_disk_in_a_real_command_is_one_line(args, work, text, tmp_path):
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        args = [a.format(model=shipped_model_path(), text=text, disk=disk) for a in args]
        res = gqa_cli(args, work, env={"GQA_PROGRESS": "0"})  # progress lines share stderr
        assert_one_line_refusal(res, "free some disk space")
        leftovers = [p for p in disk.rglob("*") if p.is_file() and p.name != ".gqa-training"]
        assert leftovers == [] or args[0] == "uptrain", leftovers  # uptrain keeps its run folder for --resume


def test_validation_defaults_to_the_corpus_the_user_asked_for(work, text):
    assert held_out_spec("shakespeare:train") == "shakespeare:validation"
    assert held_out_spec("english:calib") == "english:eval" and held_out_spec("pydoc") == "pydoc:eval"
    assert held_out_spec(str(text)) is None
    res = gqa_cli(["uptrain", shipped_model_path(), work / "out", "--data", text, "--tokens", "500"], work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no validation text" in res.stdout and "shakespeare" not in res.stdout + res.stderr


def test_a_local_file_named_like_a_built_in_corpus_is_ambiguous(work):
    (work / "english").write_text("my own english text\n")
    res = gqa_cli(["eval", shipped_model_path(), "--data", "english"], work)
    assert_one_line_refusal(res, "pass ./english for the file")
    res = gqa_cli(["eval", shipped_model_path(), "--data", "./english"], work)
    assert res.returncode != 2 or "built-in corpus" not in res.stderr, res.stderr[-1000:]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "a", "b", "--kv-heads", "x"], "Invalid value for '--kv-heads'"),
        (["eval", "m", "--max-tokens", "1e3"], "Invalid value for '--max-tokens'"),
        (["convert", "--bogus"], "No such option: --bogus"),
        (["convert"], "Missing argument"),
        (["bogus"], "No such command"),
    ],
)
def test_unparsable_command_lines_are_one_line_not_a_box(args, needle, work):
    line = assert_one_line_refusal(gqa_cli(args, work, timeout=60), needle)
    assert "--help" in line


def test_help_and_bare_commands_still_print_help(work):
    res = gqa_cli(["memory", "--help"], work, timeout=60)
    assert res.returncode == 0 and "Usage: gqa memory" in res.stdout
    res = gqa_cli([], work, timeout=60)
    assert res.returncode == 2 and "Usage: gqa" in res.stdout


@pytest.mark.parametrize(
    "extra,needle",
    [(["--alpha", "1"], "pass --teacher SRC or drop --alpha"), (["--seq-len", "4096"], "use --seq-len 256 or less")],
)
def test_uptrain_options_that_would_be_ignored_or_overflow_are_refused(extra, needle, work, text):
    res = gqa_cli(["uptrain", shipped_model_path(), work / "out", "--data", text, "--tokens", "100", *extra], work)
    assert_one_line_refusal(res, needle)
    assert list(work.iterdir()) == []


def test_eval_reads_gqas_own_decilm_export(work):
    """`gqa eval` could not read a `--export decilm` folder (transformers has no class for it without the
    folder's code); it now reads it through gqa's DeciLM reader, with the numbers of the hf export."""
    src = shipped_model_path()
    for layout in ("hf", "decilm"):
        res = gqa_cli(["convert", src, work / layout, "--kv-heads", "2", "--export", layout], work)
        assert res.returncode == 0, res.stderr[-2000:]
    out = {}
    for layout in ("hf", "decilm"):
        res = gqa_cli(["eval", work / layout, "--max-tokens", "1000", "--json"], work)
        assert res.returncode == 0, res.stderr[-2000:]
        out[layout] = res.stdout
    assert json.loads(out["hf"])["perplexity"] == pytest.approx(json.loads(out["decilm"])["perplexity"], rel=1e-6)


def test_too_few_calibration_tokens_for_distillation_are_refused_before_loading(work, text):
    """Refused after loading and calibrating, without the minimum, before; now at once, naming it."""
    from gqa.convert.calibrated.distill import min_sequences

    args = ["convert", shipped_model_path(), work / "out", "--kv-heads", "2", "--calib", text]
    res = gqa_cli([*args, "--calib-tokens", "600", "--distill", "local"], work)
    line = assert_one_line_refusal(res, f"({min_sequences()} sequences of --seq-len")
    assert "or more" in line
    assert list(work.iterdir()) == []
    assert min_sequences(0.1) == 6 and min_sequences(0.25) == 3 and min_sequences(0) == 1
