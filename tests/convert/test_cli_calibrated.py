"""``gqa convert`` with calibration: per-layer heads through the CLI, DeciLM export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gqa import GQAConfig, GQAForCausalLM, load_hf, save_hf
from gqa.cli import app
from gqa.formats.decilm import load_decilm

runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny MHA Llama folder with a byte-level tokenizer, and a calibration text file."""
    from gqa.data import save_tokenizer, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("src")
    text = " ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(400))
    tok = train_bpe_tokenizer(text, vocab_size=300)
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=256, max_seq_len=64)
    save_hf(GQAForCausalLM(cfg), root / "model")
    save_tokenizer(tok, root / "model")
    (root / "calib.txt").write_text(text)
    return root


def run(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


def test_per_layer_heads_and_report(source, tmp_path):
    out = tmp_path / "out"
    r = run(
        source / "model",
        out,
        "--kv-heads-per-layer",
        "4,2,1",
        "--calib",
        source / "calib.txt",
        "--calib-tokens",
        256,
        "--grouping",
        "similarity",
        "--merge",
        "fit",
        "--distill",
        "none",  # distillation (the default with --calib) has its own tests
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["per_layer_config"] == {
        "0": {"num_key_value_heads": 4},
        "1": {"num_key_value_heads": 2},
        "2": {"num_key_value_heads": 1},
    }
    model = load_hf(out)
    assert model.config.kv_heads_per_layer == [4, 2, 1]
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["kv_heads_after"] == [4, 2, 1]
    assert report["layer_errors"][0] == 0.0  # nothing merged in layer 0: exact
    # the report states the dtype actually written (the source's float32 here), not an assumed one
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = f.get_tensor("model.layers.1.self_attn.k_proj.weight").dtype
    assert report["kv_cache_dtype"] == report["output_dtype"] == str(written).removeprefix("torch.") == "float32"
    assert (out / "tokenizer.json").is_file()


def test_budget_and_decilm_export(source, tmp_path):
    out = tmp_path / "deci"
    r = run(
        source / "model",
        out,
        "--kv-budget",
        0.5,
        "--calib",
        source / "calib.txt",
        "--calib-tokens",
        256,
        "--export",
        "decilm",
        "--distill",
        "none",
    )
    assert r.exit_code == 0, r.output
    model = load_decilm(out)
    heads = model.config.kv_heads_per_layer
    assert sum(heads) <= 6 and all(4 % h == 0 for h in heads)
    assert json.loads((out / "conversion_report.json").read_text())["kv_heads_after"] == heads


def test_budget_spent_by_distilled_curves(source, tmp_path):
    """--budget-curves distilled: the budget is chosen from errors measured after local distillation (in the
    report's error curves), then the chosen heads are distilled as usual."""
    out = tmp_path / "distilled"
    calib = ["--calib", source / "calib.txt", "--calib-tokens", 2560, "--distill-steps", 5]
    r = run(source / "model", out, "--kv-budget", 0.5, *calib, "--budget-curves", "distilled")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "conversion_report.json").read_text())
    heads = report["kv_heads_after"]
    assert sum(heads) <= 6 and report["distill"]["steps"] == 5
    curves = report["error_curves"]
    assert [sorted(c, key=int) for c in curves] == [["1", "2", "4"]] * 3 and all(c["4"] == 0.0 for c in curves)
    assert load_hf(out).config.kv_heads_per_layer == heads


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kv-budget", "0.2", "--calib", "{calib}"], "every layer needs one"),
        (["--kv-heads-per-layer", "4,2", "--calib", "{calib}"], "lists 2 layers"),
        (["--kv-heads-per-layer", "4,3,1", "--calib", "{calib}"], "(layer 1) 3 does not divide"),
        (["--kv-heads", "2", "--calib", "{calib}", "--calib-tokens", "10000000"], "fewer than --calib-tokens"),
        (["--kv-heads", "2", "--grouping", "similarity"], "--calib TEXT is needed"),
        (["--kv-heads", "2", "--kv-budget", "0.5", "--calib", "{calib}"], "exactly one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, args, message):
    out = tmp_path / "bad"
    args = [a.replace("{calib}", str(source / "calib.txt")) for a in args]
    r = run(source / "model", out, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_local_distillation_through_convert(source, tmp_path):
    """--distill local after the merge: its report (per-layer held-out errors) lands in conversion_report.json,
    no distilled layer ends worse than merged on held-out text, and the same seed gives the same weights."""
    from gqa.convert import convert

    common = dict(kv_heads=1, calib=str(source / "calib.txt"), calib_tokens=320, seq_len=32, progress=False)
    rep = convert(source / "model", tmp_path / "a", distill="local", distill_steps=6, distill_params="kv", **common)
    assert rep.path == "calibrated"
    d = json.loads((tmp_path / "a" / "conversion_report.json").read_text())["distill"]
    assert d == rep.distill and d["params"] == "kv" and d["inputs"] == "converted" and len(d["layers"]) == 3
    assert d["lr"] == 3e-3 and d["weighting"] == "token-max" and not d["solve_o"]  # o_proj is solved only when it trains (qkvo)
    for layer in d["layers"]:
        assert layer["error_after"] <= layer["error_before"]
    convert(source / "model", tmp_path / "b", distill="local", distill_steps=6, distill_params="kv", **common)
    a, b = load_hf(tmp_path / "a"), load_hf(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_distill_options_reach_the_report_through_the_cli(source, tmp_path):
    out = tmp_path / "o"
    r = run(source / "model", out, "--kv-heads", 1, "--calib", source / "calib.txt", "--calib-tokens", 2560,
            "--distill", "local", "--distill-steps", 3, "--distill-lr", "1e-2",
            "--distill-inputs", "original", "--distill-params", "kv")  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads((out / "conversion_report.json").read_text())["distill"]
    assert (d["lr"], d["inputs"], d["params"], d["steps"]) == (0.01, "original", "kv", 3)


def test_attention_statistics_are_skipped_when_they_would_not_fit(source, tmp_path, monkeypatch):
    """--merge fit on a host whose memory could not hold the attention statistics (a 7B model on 24 GB):
    the merge fits on input moments, and the report says so."""
    from gqa.convert import convert
    from gqa.convert.calibrated import run as calibrated_run

    common = dict(kv_heads=1, merge="fit", calib=str(source / "calib.txt"), calib_tokens=320, seq_len=32,
                  distill="none", progress=False)  # fmt: skip
    full = convert(source / "model", tmp_path / "a", **common)
    assert "note" not in full.calibration
    monkeypatch.setattr(calibrated_run, "_available_memory", lambda: 1000)
    small = convert(source / "model", tmp_path / "b", **common)
    assert "attention statistics --merge fit uses would take" in small.calibration["note"]
    assert small.layer_errors != full.layer_errors  # fitted without them: a different merge


@pytest.mark.parametrize(
    "args,message",
    [
        (["--distill", "local"], "--calib TEXT is needed for --distill"),
        (["--distill", "global", "--calib", "{calib}"], "unknown --distill 'global'"),
        (["--distill", "local", "--distill-params", "qk", "--calib", "{calib}"], "unknown --distill-params 'qk'"),
        (["--distill", "local", "--distill-inputs", "mixed", "--calib", "{calib}"], "unknown --distill-inputs"),
        (["--distill", "local", "--distill-steps", "0", "--calib", "{calib}"], "--distill-steps must be"),
        (["--distill", "local", "--distill-lr", "0", "--calib", "{calib}"], "--distill-lr must be a positive"),
        (["--distill", "local", "--distill-lr", "nan", "--calib", "{calib}"], "--distill-lr must be a positive"),
        (["--merge", "random", "--calib", "{calib}"], "drop --calib"),
    ],
)
def test_bad_distill_options_are_one_line(source, tmp_path, args, message):
    out = tmp_path / "bad"
    args = [a.replace("{calib}", str(source / "calib.txt")) for a in args]
    r = run(source / "model", out, "--kv-heads", 1, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_decilm_and_gguf_exports_without_calibration(source, tmp_path):
    """Exports that need the model in memory take the calibrated path's loader; with no --calib they
    merge contiguous groups by the mean, like the streaming path."""
    from gqa.convert import convert
    from gqa.formats.gguf import load_gguf

    stream = convert(source / "model", tmp_path / "hf", kv_heads=2, progress=False)
    deci = convert(source / "model", tmp_path / "deci", kv_heads=2, export="decilm", progress=False)
    gguf = convert(
        source / "model",
        tmp_path / "gguf",
        kv_heads_per_layer=[4, 2, 1],
        export="gguf",
        dtype="float32",
        progress=False,
    )
    assert stream.path == "streaming" and deci.path == gguf.path == "calibrated" and not deci.align
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        want = load_hf(tmp_path / "hf")(ids)
        torch.testing.assert_close(load_decilm(tmp_path / "deci")(ids), want, rtol=1e-5, atol=1e-5)
        model = load_gguf(tmp_path / "gguf" / "model.gguf")
    assert model.config.kv_heads_per_layer == [4, 2, 1]
    assert json.loads((tmp_path / "gguf" / "conversion_report.json").read_text())["export"] == "gguf"


def test_gguf_export_refuses_a_source_without_tokenizer(source, tmp_path):
    """A GGUF without a tokenizer cannot run in llama.cpp: refused in one line before any weight is read."""
    import shutil

    src = tmp_path / "no-tok"
    shutil.copytree(source / "model", src)
    (src / "tokenizer.json").unlink()
    r = run(src, tmp_path / "out", "--kv-heads", 2, "--export", "gguf")
    assert r.exit_code == 2, r.output
    assert "tokenizer.json" in r.output and "--export hf" in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tok"]
    from gqa.convert.exports import EXPORTS
    from gqa.errors import GQAUserError

    with pytest.raises(GQAUserError, match="tokenizer.json"):  # the writer itself refuses too
        EXPORTS["gguf"].write(None, tmp_path / "w", None, src, src)
    assert not (tmp_path / "w").exists()


def test_calibrated_output_dtype_is_what_the_report_says(source, tmp_path):
    from safetensors import safe_open

    from gqa.convert import convert

    rep = convert(
        source / "model", tmp_path / "bf16", kv_heads=2, calib=str(source / "calib.txt"), calib_tokens=256,
        dtype="bfloat16", distill="none", progress=False,
    )  # fmt: skip
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.bfloat16
    assert rep.kv_cache_dtype == rep.output_dtype == "bfloat16"
    assert rep.kv_cache_bytes_per_token_after == 2 * 3 * 2 * 16 * 2  # K and V x layers x heads x D x bytes


@pytest.mark.timeout(600)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from([("kv_heads", 2), ("kv_heads", 8), ("kv_heads", 3), ("kv_heads_per_layer", "4,2,1"),
                            ("kv_budget", 0.5), ("kv_budget", float("inf"))]),
    grouping=st.sampled_from(["contiguous", "similarity", "random"]),
    merge=st.sampled_from(["mean", "first", "random", "weighted", "lsq", "fit", "median"]),
    calib=st.booleans(),
    export=st.sampled_from(["hf", "decilm", "gguf", "onnx"]),
    distill=st.sampled_from([None, "local", "none"]),  # None: the default (local with --calib)
    dtype=st.sampled_from([None, "bfloat16", "int8"]),
)  # fmt: skip
def test_every_option_combination_works_or_is_one_line(source, target, grouping, merge, calib, export, distill, dtype):
    """The routing promise of convert(): any combination either converts (OUT holds a report and a model)
    or is refused with one GQAUserError line and nothing written; never another exception."""
    import tempfile

    from gqa.convert import convert
    from gqa.errors import GQAUserError

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        kwargs = dict(
            {target[0]: target[1]}, grouping=grouping, merge=merge, export=export, distill=distill,
            distill_steps=2, dtype=dtype, calib=str(source / "calib.txt") if calib else None,
            calib_tokens=320, seq_len=32, progress=False,
        )  # fmt: skip
        try:
            report = convert(source / "model", out, **kwargs)
        except GQAUserError as e:
            assert "\n" not in str(e) and str(e)
            assert list(Path(tmp).iterdir()) == []
            return
        assert (out / "conversion_report.json").is_file()
        assert report.export == export and report.path == (
            "streaming" if export == "hf" and not calib else "calibrated"
        )
        assert (out / ("model.gguf" if export == "gguf" else "model.safetensors")).is_file()


def test_per_layer_gguf_source_converts(tmp_path):
    """Sources with per-layer KV heads (a per_layer_config folder; a deci GGUF, which transformers cannot read)
    convert through gqa's own readers, the GGUF to the same model as the folder it was exported from."""
    from gqa.convert import convert
    from gqa.formats.gguf import export_gguf

    asset = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"  # BPE tokenizer
    torch.manual_seed(0)
    cfg = GQAConfig(
        vocab_size=2048, d_model=64, n_layers=3, n_heads=4, n_kv_heads=[2, 1, 4], ffn_dim=96, max_seq_len=64
    )
    m = GQAForCausalLM(cfg).eval()
    folder = save_hf(m, tmp_path / "folder", side_files_from=asset)
    export_gguf(m, tmp_path / "var.gguf", tokenizer_dir=folder, dtype="f32")
    rep = convert(tmp_path / "var.gguf", tmp_path / "from-gguf", kv_heads=1, progress=False)
    rep_folder = convert(folder, tmp_path / "from-folder", kv_heads=1, progress=False)
    for r in (rep, rep_folder):
        assert r.path == "calibrated" and r.kv_heads_before == [2, 1, 4] and r.kv_heads_after == [1, 1, 1]
    ids = torch.tensor([[5, 900, 17, 2000, 33]])
    with torch.no_grad():
        got, want = load_hf(tmp_path / "from-gguf")(ids), load_hf(tmp_path / "from-folder")(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "from-gguf" / "tokenizer.json").is_file()


def test_calibration_text_alone_runs_the_best_measured_recipe(source, tmp_path):
    """gqa convert SRC OUT --kv-heads N --calib TEXT: similarity grouping, alignment, the fit merge and local
    distillation, with nothing else given (the distillation steps cut here to keep the test fast)."""
    out = tmp_path / "o"
    r = run(source / "model", out, "--kv-heads", 1, "--calib", source / "calib.txt", "--calib-tokens", 1536,
            "--distill-steps", 2)  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((out / "conversion_report.json").read_text())
    assert (report["grouping"], report["merge"], report["align"]) == ("similarity", "fit", True)
    assert report["distill"]["params"] == "qkvo" and report["distill"]["steps"] == 2


def test_distilling_the_mlp_too_through_convert(source, tmp_path):
    """--distill-params qkvo-mlp: the MLP moves with the attention (block loss) and is written to OUT."""
    from safetensors import safe_open

    from gqa.convert import convert

    rep = convert(source / "model", tmp_path / "m", kv_heads=1, calib=str(source / "calib.txt"), calib_tokens=320,
                  seq_len=32, distill_steps=20, distill_lr=1e-3, distill_params="qkvo-mlp", progress=False)  # fmt: skip
    assert (rep.distill["params"], rep.distill["loss"]) == ("qkvo-mlp", "block")
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as a, safe_open(
        str(next((source / "model").glob("*.safetensors"))), "pt"
    ) as b:
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))
