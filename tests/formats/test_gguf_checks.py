"""The checked GGUF header (issue 26): every metadata value through the limits table and every tensor the
metadata implies present with its shape, before anything is allocated or handed to transformers.

A ``llama`` file lacking one layer's ``attn_k.weight`` used to load with a random weight; ``block_count = 2^31``
hung; a ``deci`` file's per-layer arrays of the wrong length were read as uniform while ``gqa memory`` refused
them; ``head_count 0`` or a missing ``block_count`` was a traceback. Now each is one line from the one reader,
and loading, converting and ``gqa memory`` give the same line for the same file.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gqa.cli import app
from gqa.errors import GQAUserError
from gqa.formats.gguf import _expected_tensors, export_gguf, load_gguf, read_gguf_header
from gqa.memory import memory_report
from gqa.model import GQAConfig, GQAForCausalLM
from gqa.model.loading import load_model
from helpers import assert_one_line_refusal, digest, gqa_cli

ASSET = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"  # BPE tokenizer, 2048 ids
TEXT = (
    "KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our English dead.\n"
    * 4
)
V = gguf.GGUFValueType
runner = CliRunner()


def tiny(n_kv) -> GQAForCausalLM:
    """2 layers (or one per entry of ``n_kv``), 4 query heads of 8, vocab of the shipped tokenizer."""
    torch.manual_seed(0)
    layers = len(n_kv) if isinstance(n_kv, list) else 2
    cfg = GQAConfig(
        vocab_size=2048, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=n_kv, ffn_dim=48, max_seq_len=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GQAForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A complete f32 ``llama`` GGUF (uniform KV heads) and a ``deci`` one (per-layer), with a tokenizer."""
    d = tmp_path_factory.mktemp("pristine")
    return {
        "llama": export_gguf(tiny(2), d / "llama.gguf", tokenizer_dir=ASSET, dtype="f32"),
        "deci": export_gguf(tiny([2, 1, 4]), d / "deci.gguf", tokenizer_dir=ASSET, dtype="f32"),
    }


def _value_type(value) -> tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """The GGUF type a test value is written as (lists: an array of the widest type its entries need)."""
    if isinstance(value, list):
        sub = max((_value_type(v)[0] for v in value), default=V.UINT32, key=lambda t: t.value)
        return V.ARRAY, sub
    if isinstance(value, bool):
        return V.BOOL, None
    if isinstance(value, int):
        return (V.INT64 if value < 0 else V.UINT64 if value >= 2**32 else V.UINT32), None
    if isinstance(value, float):
        return V.FLOAT32, None
    return V.STRING, None


def rewrite(src: Path, dst: Path, *, meta: dict | None = None, drop=(), reshape: dict | None = None) -> Path:
    """Copy the GGUF ``src`` to ``dst`` with metadata ``meta`` (key -> value, None deletes it) changed,
    the tensors in ``drop`` left out and those in ``reshape`` replaced by zeros of the given numpy shape."""
    meta, reshape = meta or {}, reshape or {}
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in meta:
            continue
        main = f.types[0]
        w.add_key_value(key, f.contents(), main, sub_type=f.types[-1] if main == V.ARRAY else None)
    for key, value in meta.items():
        if value is not None:
            w.add_key_value(key, value, *_value_type(value))
    for t in r.tensors:
        if t.name in drop:
            continue
        w.add_tensor(t.name, np.zeros(reshape[t.name], np.float32) if t.name in reshape else np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def command_args(command: str, gguf_path: Path, tmp_path: Path) -> list[str]:
    """The arguments of ``gqa COMMAND`` on ``gguf_path`` (writes the evaluation text it needs)."""
    (tmp_path / "text.txt").write_text(TEXT)
    return {
        "eval": ["eval", str(gguf_path), "--data", str(tmp_path / "text.txt"), "--max-tokens", "64"],
        "memory": ["memory", str(gguf_path)],
        "convert": ["convert", str(gguf_path), str(tmp_path / "out"), "--kv-heads", "1"],
        "generate": ["generate", str(gguf_path), "-p", "To be", "--max-new-tokens", "2"],
    }[command]


def refusal(fn, *args) -> str:
    """The one line ``fn(*args)`` refuses with."""
    with pytest.raises(GQAUserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- defect 1: every tensor the metadata implies, with its shape -------------------------------------


@pytest.mark.parametrize("arch", ["llama", "deci"])
@pytest.mark.parametrize(
    "edit,needle",
    [
        (dict(drop=["blk.1.attn_k.weight"]), "lacks tensor blk.1.attn_k.weight"),
        (dict(drop=["output_norm.weight"]), "lacks tensor output_norm.weight"),
        (dict(drop=["token_embd.weight"]), "lacks tensor token_embd.weight"),
        (dict(reshape={"blk.0.ffn_up.weight": (40, 32)}), "tensor blk.0.ffn_up.weight has shape [32, 40]"),
        (dict(reshape={"blk.1.attn_v.weight": (24, 32)}), "tensor blk.1.attn_v.weight has shape [32, 24]"),
    ],
)
def test_incomplete_file_is_refused_by_every_reader(pristine, tmp_path, arch, edit, needle):
    bad = rewrite(pristine[arch], tmp_path / "bad.gguf", **edit)
    msg = refusal(read_gguf_header, bad)
    assert needle in msg and "re-export or re-download" in msg
    # loading (gqa's reader for deci, transformers for llama) and gqa memory give the same line
    assert refusal(load_model, bad) == msg
    assert refusal(memory_report, bad) == msg


def test_transformers_missing_weights_are_refused_too(pristine, tmp_path, monkeypatch):
    """Behind the header check, transformers' own loading report: a weight it would initialise at random
    is an error there as well (the guard for architectures gqa does not check itself)."""
    import gqa.formats.gguf as g

    bad = rewrite(pristine["llama"], tmp_path / "bad.gguf", drop=["blk.1.attn_k.weight"])
    monkeypatch.setattr(g, "_check_tensors", lambda header: None)
    msg = refusal(load_model, bad)
    assert "missing ['model.layers.1.self_attn.k_proj.weight']" in msg and "incomplete" in msg


def test_eval_refuses_an_incomplete_gguf_in_a_real_process(pristine, tmp_path):
    """The issue's probe: `gqa eval` on a llama GGUF without one layer's attn_k.weight exited 0."""
    (tmp_path / "src").mkdir()
    bad = rewrite(pristine["llama"], tmp_path / "src" / "bad.gguf", drop=["blk.1.attn_k.weight"])
    (tmp_path / "text.txt").write_text(TEXT)
    work = tmp_path / "cwd"
    work.mkdir()
    before = digest(tmp_path / "src")
    res = gqa_cli(["eval", bad, "--data", tmp_path / "text.txt", "--max-tokens", "64"], work)
    assert_one_line_refusal(res, "lacks tensor blk.1.attn_k.weight")
    assert digest(tmp_path / "src") == before and list(work.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "memory", "convert", "generate"])
def test_commands_refuse_an_incomplete_gguf(pristine, tmp_path, command):
    src = tmp_path / "src"
    src.mkdir()
    bad = rewrite(pristine["llama"], src / "bad.gguf", drop=["blk.0.ffn_gate.weight"])
    before = digest(src)
    r = runner.invoke(app, command_args(command, bad, tmp_path))
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks tensor blk.0.ffn_gate.weight" in lines[0], r.stderr
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src", "text.txt"]


def test_the_pristine_files_still_evaluate(pristine, tmp_path):
    """The control: the same files, complete, evaluate and report their KV cache."""
    (tmp_path / "text.txt").write_text(TEXT)
    for path in pristine.values():
        r = runner.invoke(
            app, ["eval", str(path), "--data", str(tmp_path / "text.txt"), "--max-tokens", "64", "--json"]
        )
        assert r.exit_code == 0, r.output
        assert math.isfinite(json.loads(r.stdout)["perplexity"])
    assert memory_report(pristine["deci"])["variants"][0]["kv_heads"] == [2, 1, 4]


# --- defect 4: metadata through the limits table before anything is allocated --------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["eval", "memory", "convert", "generate"])
def test_huge_block_count_is_refused_at_once(pristine, tmp_path, command):
    src = tmp_path / "src"
    src.mkdir()
    bad = rewrite(pristine["llama"], src / "huge.gguf", meta={"llama.block_count": 2**31})
    r = runner.invoke(app, command_args(command, bad, tmp_path))
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama.block_count must be between 1 and 4096, got 2147483648" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "text.txt"]


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("llama.embedding_length", 2**40, "embedding_length"),
        ("llama.context_length", 0, "context_length"),
        ("llama.attention.head_count", "four", "head_count must be an integer"),
        ("llama.attention.head_count_kv", 3, "3 KV heads for 4 query heads"),
        ("llama.feed_forward_length", -1, "feed_forward_length"),
        ("llama.rope.freq_base", float("nan"), "freq_base must be a positive number"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon"),
        ("llama.expert_count", 2**31, "llama.expert_count"),
        ("llama.rope.dimension_count", 4, "different head sizes"),
        ("tokenizer.ggml.eos_token_id", 2048, "eos_token_id must be between 0 and 2047"),
        ("llama.vocab_size", 100, "2048 tokens for a vocabulary of 100"),
    ],
)
def test_bad_metadata_values_are_one_line(pristine, tmp_path, key, value, needle):
    bad = rewrite(pristine["llama"], tmp_path / "bad.gguf", meta={key: value})
    msg = refusal(read_gguf_header, bad)
    assert needle in msg, msg
    assert refusal(memory_report, bad) == msg


# --- defects 6 and 7: the deci reader and gqa memory, one read and one answer ----------------------------


@pytest.mark.parametrize(
    "meta,needle",
    [
        ({"deci.attention.head_count_kv": [2, 1]}, "head_count_kv lists 2 layers but block_count is 3"),
        ({"deci.attention.head_count_kv": [2, 1, 4, 4]}, "head_count_kv lists 4 layers but block_count is 3"),
        ({"deci.attention.head_count": [4, 4]}, "head_count lists 2 layers"),
        ({"deci.feed_forward_length": [48]}, "feed_forward_length lists 1 layers"),
        ({"deci.attention.head_count": 0}, "deci.attention.head_count must be between 1 and 4096, got 0"),
        ({"deci.block_count": None}, "has no deci.block_count"),
        ({"deci.embedding_length": None}, "has no deci.embedding_length"),
    ],
)
def test_deci_reader_and_memory_give_the_same_line(pristine, tmp_path, meta, needle):
    bad = rewrite(pristine["deci"], tmp_path / "bad.gguf", meta=meta)
    msg = refusal(load_gguf, bad)
    assert needle in msg, msg
    assert refusal(load_model, bad) == msg
    assert refusal(memory_report, bad) == msg
    r = runner.invoke(app, ["memory", str(bad)])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {msg}", r.stderr


def test_deci_eval_on_head_count_zero_is_one_line(pristine, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = rewrite(pristine["deci"], src / "bad.gguf", meta={"deci.attention.head_count": 0})
    (tmp_path / "text.txt").write_text(TEXT)
    r = runner.invoke(app, ["eval", str(bad), "--data", str(tmp_path / "text.txt"), "--max-tokens", "64"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "head_count must be between 1 and 4096, got 0" in r.stderr


# --- the property: whatever the metadata and tensor table, the readers agree and never crash -------------

KEYS = [
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "context_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "rope.dimension_count",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
]
VALUES = st.one_of(
    st.none(),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 48, 2**12, 2**12 + 1, 2**31, 2**32 + 2, 2**63]),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.lists(st.sampled_from([0, 1, 2, 4, 8, 2**31]), min_size=1, max_size=5),  # GGUF has no empty arrays
    st.text(max_size=4),
    st.booleans(),
)
TENSOR_EDITS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
    st.tuples(st.just("reshape"), st.integers(0, 10_000), st.lists(st.integers(1, 70), min_size=1, max_size=2)),
)


@pytest.mark.timeout(600)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arch=st.sampled_from(["llama", "deci"]),
    meta=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3),
    edits=st.lists(TENSOR_EDITS, max_size=2),
)
def test_any_header_is_read_completely_or_refused_in_one_line(pristine, arch, meta, edits):
    names = [t.name for t in gguf.GGUFReader(str(pristine[arch])).tensors]
    drop = [names[e[1] % len(names)] for e in edits if e[0] == "drop"]
    reshape = {names[e[1] % len(names)]: tuple(e[2]) for e in edits if e[0] == "reshape"}
    with tempfile.TemporaryDirectory() as tmp:
        path = rewrite(pristine[arch], Path(tmp) / "x.gguf", meta={f"{arch}.{k}": v for k, v in meta.items()},
                       drop=drop, reshape=reshape)  # fmt: skip
        try:
            header = read_gguf_header(path)
        except GQAUserError as e:
            msg = str(e)
            assert "\n" not in msg
            # one reader, one answer: gqa memory and the loader refuse with the same line
            assert refusal(memory_report, path) == msg
            assert refusal(load_gguf, path) == msg
            return
        # accepted: every tensor the metadata implies is there with its shape, and the readers agree
        for name, shape in _expected_tensors(header).items():
            assert tuple(int(x) for x in header.tensors[name].shape) == shape
        assert memory_report(path)["n_layers"] == header.n_layers
        try:
            model = load_gguf(path)
        except GQAUserError as e:  # what gqa models do not have (attention-free layers, varying FFN widths)
            assert "\n" not in str(e)
            return
        assert model.config.n_layers == header.n_layers
        assert model.config.kv_heads_per_layer == list(header.kv_heads)


def test_convert_refuses_a_kv_target_the_header_rules_out_before_loading(pristine, tmp_path, monkeypatch):
    """--kv-heads 3 fits neither 2 KV heads nor 4 query heads: refused from the header, before loading."""
    from gqa.convert import convert
    from gqa.model import loading

    def never(*a, **kw):
        raise AssertionError("the GGUF was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", never)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(GQAUserError, match="--kv-heads 3 is not a multiple"):
        convert(pristine["llama"], tmp_path / "out", kv_heads=3, progress=False)
    assert not (tmp_path / "out").exists()
