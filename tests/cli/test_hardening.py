"""Bad model folders and options given to the real `gqa eval / generate / memory` commands (issue 12): exit code 2
with one line on stderr, no traceback, nothing written, the source folder unchanged, and code in a model folder
never run (even when stdin answers "y")."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gqa.model.assets import shipped_model_path
from helpers import assert_one_line_refusal, gqa_cli


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def model_copy(tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(shipped_model_path(), dst)
    return dst


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty working directory: anything a command writes there is a leak."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _plant_remote_code(folder: Path, marker: Path) -> None:
    """A folder whose config asks transformers to run its own code; running it creates ``marker``."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    _edit_config(folder, auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    tok_cfg = folder / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tok_cfg.write_text(json.dumps(data))


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_model_folder_code_never_runs_even_when_stdin_says_yes(model_copy, work, tmp_path, command):
    marker = tmp_path / "code-ran"
    _plant_remote_code(model_copy, marker)
    before = tree_hash(model_copy)
    args = [command, model_copy, "--max-tokens", "16"] if command == "eval" else [command, model_copy, "-p", "x"]
    res = gqa_cli(args, work, stdin="y\n" * 20)
    assert_one_line_refusal(res, "never runs code")
    assert not marker.exists()
    assert tree_hash(model_copy) == before and list(work.iterdir()) == []


@pytest.mark.parametrize(
    "changes,needle",
    [
        # the other bad values are covered in-process (tests/model/test_hf.py and the fuzz test below)
        ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
        ({"num_key_value_heads": -8}, "num_key_value_heads"),
        ({"num_hidden_layers": 5}, "lacks"),  # weights do not match the config
        ({"intermediate_size": 256}, "shape"),
        ({"num_attention_heads": None}, "'num_attention_heads'"),
    ],
)
def test_eval_refuses_bad_configs_and_mismatched_weights(model_copy, work, changes, needle):
    _edit_config(model_copy, **changes)
    if changes.get("num_attention_heads", 1) is None:
        cfg = json.loads((model_copy / "config.json").read_text())
        del cfg["num_attention_heads"]
        (model_copy / "config.json").write_text(json.dumps(cfg))
    before = tree_hash(model_copy)
    res = gqa_cli(["eval", model_copy, "--max-tokens", "16"], work, timeout=120)
    assert_one_line_refusal(res, needle)
    assert tree_hash(model_copy) == before and list(work.iterdir()) == []


def test_generate_refuses_absurd_layer_counts_before_allocating(model_copy, work):
    _edit_config(model_copy, num_hidden_layers=1e9)
    res = gqa_cli(["generate", model_copy, "-p", "x", "--max-new-tokens", "2"], work, timeout=120)
    assert_one_line_refusal(res, "num_hidden_layers")
    assert list(work.iterdir()) == []


def test_generate_with_a_tiny_temperature_samples_the_argmax(work):
    """Dividing the logits by 1e-45 made the maximum inf and softmax NaN ("probability tensor contains inf/nan")."""
    args = ["generate", shipped_model_path(), "-p", "ROMEO:", "--max-new-tokens", "6", "--json"]
    greedy = gqa_cli(args, work, timeout=120)
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    for t in ("1e-45", "5e-324"):
        res = gqa_cli([*args, "--temperature", t, "--seed", "1"], work, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["tokens"] == json.loads(greedy.stdout)["tokens"]
    assert list(work.iterdir()) == []


def test_device_cuda_without_a_gpu_is_one_line(work):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs the same on CPU-only and CUDA builds of torch.
    # (`gqa generate` runs on the CPU and has no --device option; `gqa bench attention` is the inference
    # command that takes one.)
    res = gqa_cli(["bench", "attention", "--device", "cuda", "--out", "out"], work, env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_refusal(res, "--device cuda needs a CUDA GPU")
    assert list(work.iterdir()) == []


def test_eval_refuses_config_json_that_is_a_list(model_copy, work):
    (model_copy / "config.json").write_text("[1, 2, 3]")
    assert_one_line_refusal(gqa_cli(["eval", model_copy], work), "JSON list")


def test_eval_refuses_seq_len_past_the_context(model_copy, work):
    res = gqa_cli(["eval", model_copy, "--seq-len", "100000"], work)
    line = assert_one_line_refusal(res, "--seq-len 100000")
    assert "use --seq-len 256 or less" in line


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"num_attention_heads": 1e12}, "num_attention_heads"),
        ({"num_key_value_heads": -8}, "num_key_value_heads"),
        ({"per_layer_config": ["x"]}, "per_layer_config"),
    ],
)
def test_memory_refuses_absurd_configs_quickly(tmp_path, work, changes, needle):
    cfg = json.loads((shipped_model_path() / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = gqa_cli(["memory", tmp_path / "config.json"], work, timeout=60)
    assert_one_line_refusal(res, needle)
    assert list(work.iterdir()) == []


def test_memory_refuses_a_cut_gguf_and_infinite_budget(tmp_path, work):
    import random

    # A GGUF header (magic, version 3, 10 tensors, 5 metadata entries) cut off after 1,000 bytes.
    head = b"GGUF" + (3).to_bytes(4, "little") + (10).to_bytes(8, "little") + (5).to_bytes(8, "little")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head + random.Random(0).randbytes(1000 - len(head)))
    assert_one_line_refusal(gqa_cli(["memory", cut], work), "truncated or not GGUF")
    cfg = shipped_model_path() / "config.json"
    assert_one_line_refusal(gqa_cli(["memory", cfg, "--budget", "inf"], work), "finite")


def test_a_bug_keeps_its_traceback(work):
    """Only user errors become one line: an internal TypeError still shows where it happened."""
    code = (
        "import typer, sys\n"
        "from gqa.cli.common import user_errors\n"
        "app = typer.Typer()\n"
        "@app.command()\n"
        "@user_errors\n"
        "def boom():\n"
        "    {}['missing']\n"
        "sys.argv[0] = 'x'; app()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError" in res.stderr


# --- fuzz: config.json values for `gqa eval` and `gqa memory` (in-process, time-limited) -----------------

FIELDS = [
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "per_layer_config",
    "model_type",
    "eos_token_id",
    "hidden_act",
    "block_configs",
    "text_config",
]


def _values():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**13), 10**13),
        st.sampled_from([0, 1, 2, 3, 4, 8, 192, 256, 2048, -1, 1e9, 1e12, 2**31, 2**63]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(["0", "1", "x", "num_key_value_heads"]), inner, max_size=3),
        ),
        max_leaves=6,
    )


def _check_outcome(result, folder_hash_before: str, folder: Path, work: Path) -> None:
    import time  # noqa: F401  (the elapsed time is checked by the caller)

    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(result.exception))[-3000:])
    assert result.exit_code in (0, 2), (result.exit_code, result.output[-2000:])
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert tree_hash(folder) == folder_hash_before
    assert list(work.iterdir()) == []


def test_fuzz_config_values_for_eval_and_memory(tmp_path):
    """Random config.json values: exit 0, or exit 2 with one line; never a traceback, a hang or a write."""
    import os
    import time

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from typer.testing import CliRunner

    from gqa.cli import app

    folder = tmp_path / "m"
    shutil.copytree(shipped_model_path(), folder)
    original = json.loads((folder / "config.json").read_text())
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    work = tmp_path / "cwd"
    work.mkdir()
    runner = CliRunner()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.dictionaries(st.sampled_from(FIELDS), _values(), min_size=1, max_size=3), st.booleans())
    def run(changes, drop):
        cfg = dict(original)
        cfg.update(changes)
        if drop:  # also try the field missing altogether
            cfg.pop(next(iter(changes)), None)
        (folder / "config.json").write_text(json.dumps(cfg))
        before = tree_hash(folder)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            for args in (
                ["memory", str(folder), "--json"],
                [
                    "eval",
                    str(folder),
                    "--data",
                    str(text),
                    "--seq-len",
                    "16",
                    "--batch-size",
                    "2",
                    "--max-tokens",
                    "24",
                    "--json",
                ],
            ):
                start = time.monotonic()
                result = runner.invoke(app, args)
                assert time.monotonic() - start < 60, f"{args[0]} took too long on {changes}"
                _check_outcome(result, before, folder, work)
        finally:
            os.chdir(cwd)

    run()


def test_transformers_strict_config_validation_is_one_line(model_copy, tmp_path):
    """A value only transformers validates (huggingface_hub strict dataclasses) still ends in one line."""
    from typer.testing import CliRunner

    from gqa.cli import app

    _edit_config(model_copy, initializer_range="abc")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.")
    res = CliRunner().invoke(app, ["eval", str(model_copy), "--data", str(text)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "initializer_range" in lines[0] and lines[0].startswith("error: ")
