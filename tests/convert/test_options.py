"""``ConvertOptions``: every option checked in one place, before any file is read; ``gqa convert``'s options are
its fields; ``convert(src, out, **kwargs)`` and ``convert(src, out, options=...)`` are the same conversion."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gqa.cli import app
from gqa.convert import ConvertOptions, convert
from gqa.convert.options import cli_fields
from gqa.errors import GQAUserError
from helpers import build, save

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"
CALIB = {"calib": "shakespeare:train"}

# (options, words the one-line message must contain, whether the command line can say it)
BAD = {
    "no-target": ({}, "give exactly one of --kv-heads, --kv-heads-per-layer, --kv-budget or --kv-latent", True),
    "two-targets": ({"kv_heads": 2, "kv_budget": 0.5}, "(got --kv-heads, --kv-budget)", True),
    "kv-heads-zero": ({"kv_heads": 0}, "--kv-heads must be a whole number >= 1", True),
    "kv-heads-bool": ({"kv_heads": True}, "--kv-heads must be a whole number >= 1", False),
    "kv-heads-float": ({"kv_heads": 2.0}, "--kv-heads must be a whole number >= 1", False),
    "per-layer-text": ({"kv_heads_per_layer": "4,x"}, "--kv-heads-per-layer must be comma-separated integers", True),
    "per-layer-list": ({"kv_heads_per_layer": [4, "2"]}, "--kv-heads-per-layer must be a list of integers", False),
    "per-layer-number": ({"kv_heads_per_layer": 4}, "--kv-heads-per-layer must be a list of integers", False),
    "budget-zero": ({"kv_budget": 0.0, **CALIB}, "--kv-budget must be a fraction in (0, 1]", True),
    "budget-above-one": ({"kv_budget": 1.5, **CALIB}, "--kv-budget must be a fraction in (0, 1]", True),
    "budget-nan": ({"kv_budget": math.nan, **CALIB}, "--kv-budget must be a fraction in (0, 1]", True),
    "budget-text": ({"kv_budget": "0.5", **CALIB}, "--kv-budget must be a fraction in (0, 1]", False),
    "grouping": ({"kv_heads": 2, "grouping": "random"}, "unknown --grouping 'random'", True),
    "merge": ({"kv_heads": 2, "merge": "median"}, "mean, first, random", True),
    "export": ({"kv_heads": 2, "export": "onnx"}, "unknown --export 'onnx'", True),
    "dtype": ({"kv_heads": 2, "dtype": "int8"}, "float32, bfloat16, float16", True),
    "seed": ({"kv_heads": 2, "seed": -1}, "--seed must be a whole number in 0 .. 2^64 - 1", True),
    "calib-tokens": ({"kv_heads": 2, "calib_tokens": 0}, "--calib-tokens must be a whole number >= 1", True),
    "seq-len": ({"kv_heads": 2, "seq_len": 0}, "seq_len must be a whole number >= 1", False),
    "distill": ({"kv_heads": 2, "distill": "global", **CALIB}, "unknown --distill 'global'", True),
    "distill-steps": (
        {"kv_heads": 2, "distill": "local", "distill_steps": 0, **CALIB},
        "--distill-steps must be a whole number >= 1",
        True,
    ),
    "distill-window": (
        {"kv_heads": 2, "distill": "local", "distill_window": 0, **CALIB},
        "--distill-window must be a whole number >= 1",
        True,
    ),
    "distill-params": ({"kv_heads": 2, "distill": "local", "distill_params": "q", **CALIB}, "kv, qkvo", True),
    "distill-inputs": (
        {"kv_heads": 2, "distill": "local", "distill_inputs": "x", **CALIB},
        "original, converted",
        True,
    ),
    "distill-lr-zero": ({"kv_heads": 2, "distill": "local", "distill_lr": 0.0, **CALIB}, "--distill-lr must be", True),
    "distill-lr-inf": ({"kv_heads": 2, "distill": "local", "distill_lr": math.inf, **CALIB}, "positive number", True),
    "budget-curves": ({"kv_budget": 0.5, "budget_curves": "best", **CALIB}, "merged, distilled", True),
    "budget-curves-no-budget": (
        {"kv_heads": 2, "budget_curves": "distilled", **CALIB},
        "--budget-curves distilled chooses KV heads per layer: it needs --kv-budget",
        True,
    ),
    "budget-curves-no-distill": (
        {"kv_budget": 0.5, "budget_curves": "distilled", "distill": "none", **CALIB},
        "drop --distill none",
        True,
    ),
    "similarity-needs-calib": (
        {"kv_heads": 2, "grouping": "similarity"},
        "--calib TEXT is needed for --grouping",
        True,
    ),
    "lsq-needs-calib": ({"kv_heads": 2, "merge": "lsq"}, "--calib TEXT is needed for --merge lsq", True),
    "budget-needs-calib": ({"kv_budget": 0.5}, "--calib TEXT is needed for --kv-budget", True),
    "distill-needs-calib": ({"kv_heads": 2, "distill": "local"}, "--calib TEXT is needed for --distill", True),
    "distill-too-few-tokens": (
        {"kv_heads": 2, "distill": "local", "calib_tokens": 600, **CALIB},
        "sequences of --seq-len 256",
        True,
    ),
    "random-with-calib": ({"kv_heads": 2, "merge": "random", **CALIB}, "drop --calib", True),
    "random-not-streaming": ({"kv_heads": 2, "merge": "random", "export": "decilm"}, "streaming path only", True),
    "groups-with-calib": ({"kv_heads": 2, "groups": [[0, 1]], **CALIB}, "explicit groups are a streaming-path", False),
}


def _one_line(message: str, needle: str) -> None:
    assert "\n" not in message and needle in message, message
    assert "does not exist" not in message  # refused before the (missing) source was looked at


@pytest.mark.parametrize("name", list(BAD))
def test_bad_option_is_refused_in_one_line_before_any_file_is_read(name, tmp_path):
    options, needle, _ = BAD[name]
    with pytest.raises(GQAUserError) as built:
        ConvertOptions(**options)
    _one_line(str(built.value), needle)
    with pytest.raises(GQAUserError) as called:
        convert(tmp_path / "no-such-source", tmp_path / "out", progress=False, **options)
    assert str(called.value) == str(built.value)
    assert list(tmp_path.iterdir()) == []


def _cli_args(options: dict) -> list[str]:
    flags = {f.name: f.metadata["flag"] for f in cli_fields()}
    return [a for k, v in options.items() for a in ([flags[k]] if v is True else [flags[k], str(v)])]


@pytest.mark.parametrize("name", [n for n, (_, _, cli) in BAD.items() if cli])
def test_bad_option_on_the_command_line_is_one_line_exit_2(name, tmp_path):
    options, needle, _ = BAD[name]
    args = ["convert", str(tmp_path / "no-such-source"), str(tmp_path / "out"), *_cli_args(options)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    _one_line(lines[0], needle)
    assert list(tmp_path.iterdir()) == []


def _convert_command():
    return typer.main.get_command(app).commands["convert"]


def test_cli_options_are_the_dataclass_fields():
    params = [p for p in _convert_command().params if p.name not in ("src", "out", "help")]
    fields = cli_fields()
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.opts == [f.metadata["flag"]] and p.secondary_opts == []
        assert p.default == f.default and p.help == f.metadata["help"]
    library_only = {f.name for f in dataclasses.fields(ConvertOptions)} - {f.name for f in fields}
    assert library_only == {"seq_len", "progress", "groups", "fsync"}
    assert [p.name for p in _convert_command().params][:2] == ["src", "out"]


def _readme_convert_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["gqa", "convert"]:
                commands.append(words[2:])
    return commands


def test_readme_convert_commands_parse_into_valid_options():
    commands = _readme_convert_commands()
    assert commands
    for args in commands:
        ctx = _convert_command().make_context("convert", list(args))
        options = {k: v for k, v in ctx.params.items() if k not in ("src", "out")}
        try:
            ConvertOptions(**options)  # validates, as gqa convert would
        except GQAUserError as e:  # an optional export (gguf) this environment lacks
            assert "not available in this gqa build" in str(e), (args, e)


def _same(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name != "conversion_report.json":
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ra, rb = (json.loads((f / "conversion_report.json").read_text()) for f in (a, b))
    for key in ("source", "output", "seconds", "date"):
        ra.pop(key), rb.pop(key)
    assert ra == rb


def test_kwargs_and_options_are_the_same_conversion(tmp_path):
    src = save(build("llama", n_kv=4), tmp_path / "src")
    kwargs = dict(kv_heads=2, merge="first", dtype="bfloat16", seed=3, progress=False)
    convert(src, tmp_path / "kwargs", **kwargs)
    convert(src, tmp_path / "options", options=ConvertOptions(**kwargs))
    _same(tmp_path / "kwargs", tmp_path / "options")
    # options with keyword overrides: the fields replaced, validated again
    convert(src, tmp_path / "override", options=ConvertOptions(kv_heads=1, progress=False), kv_heads=2, merge="first")
    report = json.loads((tmp_path / "override" / "conversion_report.json").read_text())
    assert report["kv_heads_after"] == [2, 2] and report["merge"] == "first"
    with pytest.raises(GQAUserError, match="whole number >= 1"):
        convert(src, tmp_path / "bad", options=ConvertOptions(kv_heads=2), kv_heads=0)
    with pytest.raises(TypeError, match="ConvertOptions"):
        convert(src, tmp_path / "bad", options={"kv_heads": 2})
    assert not (tmp_path / "bad").exists()


def test_options_are_frozen_and_compare_by_value():
    a = ConvertOptions(kv_heads=2)
    assert a == ConvertOptions(kv_heads=2) and a != ConvertOptions(kv_heads=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kv_heads = 1
    assert ConvertOptions(kv_heads_per_layer="4, 4,2").per_layer == [4, 4, 2]


def test_defaults_are_the_best_measured_recipe_with_calibration_text():
    """With --calib, grouping / merge / distill default to the best measured recipe (similarity, fit, local
    distillation); without it to the streaming mean-pool; explicit values always win."""
    plain = ConvertOptions(kv_heads=2)
    assert (plain.grouping, plain.merge, plain.distill) == ("contiguous", "mean", None)
    calibrated = ConvertOptions(kv_heads=2, **CALIB)
    assert (calibrated.grouping, calibrated.merge, calibrated.distill) == ("similarity", "fit", "local")
    assert ConvertOptions(kv_budget=0.5, **CALIB).distill == "local"
    explicit = ConvertOptions(kv_heads=2, grouping="contiguous", merge="mean", distill="none", **CALIB)
    assert (explicit.grouping, explicit.merge, explicit.distill) == ("contiguous", "mean", None)
    # a default follows the option it depends on; an explicit value stays
    assert calibrated.with_changes(calib=None) == plain
    assert ConvertOptions(kv_heads=2, merge="lsq", **CALIB).with_changes(kv_heads=1).merge == "lsq"
    with pytest.raises(GQAUserError, match=r"\(the default with --calib\).*or --distill none"):
        ConvertOptions(kv_heads=2, calib_tokens=600, **CALIB)
