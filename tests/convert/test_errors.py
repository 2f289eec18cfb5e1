"""`gqa convert` bad input: one-line errors, exit code 2, nothing left in OUT, SRC never modified."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from gqa.cli import app
from gqa.convert import convert
from helpers import build, save

runner = CliRunner()


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory):
    """A tiny llama (8 query heads, 4 KV heads), sharded, plus a tokenizer side file."""
    folder = tmp_path_factory.mktemp("src") / "llama"
    save(build("llama", n_kv=4), folder, max_shard_size="20KB")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def src(source_folder, tmp_path):
    """A private copy of the source, so a test may break it."""
    folder = tmp_path / "src"
    shutil.copytree(source_folder, folder)
    return folder


def _truncate(folder):
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _missing_shard(folder):
    sorted(folder.glob("*.safetensors"))[0].unlink()


def _garbage_shard(folder):
    sorted(folder.glob("*.safetensors"))[0].write_bytes(b"this is not a safetensors file at all")


def _unknown_arch(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))


def _bad_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def _wrong_head_count(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"num_key_value_heads": 2}))


def _wrong_layout(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "phi3"}))


def _no_config(folder):
    (folder / "config.json").unlink()


def _no_weights(folder):
    for p in folder.glob("*.safetensors*"):
        p.unlink()


# name -> (break the source, extra CLI args, kv heads, error type, words the message must contain)
CASES = {
    "not-a-divisor": (None, [], "3", ValueError, "does not divide"),
    "exceeds": (None, [], "16", ValueError, "exceeds"),
    "not-a-multiple": (None, [], "6", ValueError, "not a multiple"),
    "zero": (None, [], "0", ValueError, ">= 1"),
    "merge": (None, ["--merge", "median"], "2", ValueError, "mean, first, random"),
    "dtype": (None, ["--dtype", "int8"], "2", ValueError, "float32, bfloat16, float16"),
    "truncated-safetensors": (_truncate, [], "2", ValueError, "truncated"),
    "missing-shard": (_missing_shard, [], "2", ValueError, "missing"),
    "unreadable-shard": (_garbage_shard, [], "2", ValueError, "not safetensors"),
    "unknown-architecture": (_unknown_arch, [], "2", ValueError, "supported: gemma, gemma3_text, granite, llama"),
    "config-not-json": (_bad_json, [], "2", ValueError, "not valid JSON"),
    "shape-vs-config": (_wrong_head_count, [], "2", ValueError, "does not match config.json"),
    "wrong-layout": (_wrong_layout, [], "2", ValueError, "phi3 layout"),
    "no-config": (_no_config, [], "2", ValueError, "config.json"),
    "no-weights": (_no_weights, [], "2", ValueError, "safetensors"),
}


def _assert_clean(tmp_path, before, src):
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "src")
    assert leftovers == [], f"conversion left {leftovers}"
    assert digest(src) == before, "the source was modified"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_python(name, src, tmp_path):
    breaker, args, kv, exc, needle = CASES[name]
    if breaker:
        breaker(src)
    before = digest(src)
    opts = dict(zip([a.lstrip("-") for a in args[::2]], args[1::2], strict=True))
    with pytest.raises(exc) as info:
        convert(src, tmp_path / "out", kv_heads=int(kv), progress=False, **opts)
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg
    _assert_clean(tmp_path, before, src)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_cli(name, src, tmp_path):
    breaker, args, kv, _, needle = CASES[name]
    if breaker:
        breaker(src)
    before = digest(src)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--kv-heads", kv, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    _assert_clean(tmp_path, before, src)


def test_missing_source(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--kv-heads", "1"])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_exists_needs_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = runner.invoke(app, ["convert", str(src), str(out), "--kv-heads", "2"])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "old"
    # --force replaces only an earlier model folder: a folder of other files is refused, untouched
    result = runner.invoke(app, ["convert", str(src), str(out), "--kv-heads", "2", "--force"])
    assert result.exit_code == 2 and "earlier model folder" in result.stderr, result.output
    assert (out / "keep.txt").read_text() == "old"
    (out / "conversion_report.json").write_text("{}")
    result = runner.invoke(app, ["convert", str(src), str(out), "--kv-heads", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folders left


def test_out_inside_src_is_refused(src, tmp_path):
    before = digest(src)
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(ValueError, match="outside SRC"):
            convert(src, out, kv_heads=2, force=True, progress=False)
    assert digest(src) == before


def test_failure_midway_leaves_nothing(src, tmp_path, monkeypatch):
    import gqa.convert.streaming as ckpt

    calls = []

    def failing_merge(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return ckpt_merge(*args, **kwargs)

    ckpt_merge = ckpt.merge_heads
    monkeypatch.setattr(ckpt, "merge_heads", failing_merge)
    before = digest(src)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, tmp_path / "out", kv_heads=2, progress=False)
    _assert_clean(tmp_path, before, src)


def test_cli_success_prints_table(src, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), str(out), "--kv-heads", "1", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    for needle in ("KV heads, layers 0-1", "KV cache bytes / token (bfloat16)", "parameters removed"):
        assert needle in result.stdout
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["kv_heads_after"] == [1, 1] and report["output_dtype"] == "bfloat16"
    assert f"{report['parameters_removed']:,}" in result.stdout
    assert (out / "tokenizer_config.json").is_file()


def test_truncated_gguf(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "out"), "--kv-heads", "1"])
    assert result.exit_code == 2 and "truncated or not GGUF" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
