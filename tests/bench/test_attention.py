"""``gqa bench attention``: runs, writes results with provenance, records failing peers, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gqa.bench import attention as bench
from gqa.cli import app

runner = CliRunner()

TINY = [
    bench.Case("tiny GQA", 1, 8, 2, 32, 512),
    bench.Case("tiny MQA window", 2, 8, 1, 32, 768, window=256),
]


@pytest.fixture
def tiny_cases(monkeypatch):
    monkeypatch.setattr(bench, "cases_for", lambda mode, device: list(TINY))


def test_cases_cover_the_issue():
    full = bench.cases_for("full", "cpu")
    names = {c.name for c in full}
    for variant in ("GQA", "MQA", "MHA"):
        for s in ("B=1 S=4k", "B=1 S=32k", "B=1 S=128k", "B=32 S=4k", "B=1 S=32k window=4k"):
            assert f"{variant} {s}" in names
    assert {(c.n_heads, c.head_dim) for c in full} == {(32, 128)}
    assert {c.n_kv_heads for c in full} == {1, 8, 32}
    assert len(bench.cases_for("default", "cpu")) < len(full)
    with pytest.raises(ValueError, match="unknown mode"):
        bench.cases_for("huge", "cpu")


def test_kv_bytes_count_only_the_window():
    case = bench.Case("w", 2, 32, 8, 128, 32768, window=4096)
    assert case.kv_bytes(2) == 2 * 2 * 8 * 4096 * 128 * 2
    assert case.cache_bytes(2) == 2 * 2 * 8 * 32768 * 128 * 2


def test_cli_writes_results_with_provenance(tiny_cases, tmp_path, monkeypatch):
    def no_flex(case, device):
        raise RuntimeError("flex cannot compile here\nsecond line")

    monkeypatch.setattr(bench, "_flex", no_flex)
    result = runner.invoke(
        app, ["bench", "attention", "--quick", "--min-time", "0", "--max-iters", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and {f.rsplit(".", 1)[1] for f in files} == {"json", "md", "png"}
    assert not [f for f in files if f.startswith(".")]  # no temp file left behind
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    prov = data["provenance"]
    for key in ("cpu", "cpu_cores", "versions", "git_commit", "command", "date", "dtype", "load_average"):
        assert prov[key] not in (None, ""), key
    assert prov["load_average"]["before"] and prov["load_average"]["after"]
    assert prov["command"].startswith("gqa bench attention --device cpu --dtype float32 --quick")
    assert data["bandwidth"]["before"]["copy_gbps"] > 0
    assert [c["name"] for c in data["cases"]] == [c.name for c in TINY]
    for c in data["cases"]:
        peers = {m["peer"]: m for m in c["peers"]}
        assert {"gqa", "sdpa[math]", "repeat_kv+sdpa", "flex"} <= set(peers)
        assert peers["flex"]["error"] == "RuntimeError: flex cannot compile here"  # recorded, one line
        for name in ("gqa", "sdpa[math]", "repeat_kv+sdpa"):
            m = peers[name]
            assert m["seconds"] > 0 and m["gbps"] > 0 and 0 < m["frac_copy_bw"]
            assert m["max_abs_err"] < 1e-4  # every peer computed the same attention
        assert peers["gqa"]["gqa_speedup"] == 1.0
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| gqa |" in md and "load average" in md and "flex cannot compile here" in md


def test_cli_json_output(tiny_cases, tmp_path):
    threads_before = torch.get_num_threads()
    result = runner.invoke(
        app,
        ["bench", "attention", "--quick", "--no-flex", "--min-time", "0", "--max-iters", "2"]
        + ["--json", "--out", str(tmp_path), "--dtype", "bfloat16", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["provenance"]["dtype"] == "bfloat16"
    assert data["provenance"]["torch_threads"] == 1
    assert next(tmp_path.glob("*.json")).name.endswith("-bfloat16-1threads-quick.json")
    assert torch.get_num_threads() == threads_before  # restored


def test_memory_cap_skips_and_says_why(tiny_cases, tmp_path):
    results = bench.run_attention_bench(mode="quick", min_time=0, max_iters=2, max_memory_gb=1e-6, progress=False)
    assert all("needs about" in c["skipped"] for c in results["cases"])
    paths = bench.write_results(results, tmp_path)
    assert "skipped: needs about" in paths["md"].read_text()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--device", "cuda"], "needs a CUDA GPU"),
        (["--device", "tpu"], "unknown device"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--quick", "--full"], "at most one of --quick and --full"),
        (["--max-iters", "0"], "--max-iters must be >= 1"),
        (["--threads", "0"], "--threads must be a whole number in 1 .."),
    ],
)
def test_cli_bad_input_is_one_line(args, match, tmp_path):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        args = ["--dtype", "int8"]
        match = "unknown dtype"
    result = runner.invoke(app, ["bench", "attention", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], result.output


def test_cpu_decode_cli_writes_results_with_provenance_and_goals(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "CPU_DECODE_CASES", (("tiny B=2 S=1k", 2, 1024),))
    threads_before = torch.get_num_threads()
    result = runner.invoke(
        app, ["bench", "cpu-decode", "--rounds", "2", "--threads", "1", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads_before  # restored
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.startswith("cpu-decode-") for f in files), files
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    prov = data["provenance"]
    for key in ("date", "command", "git_commit", "machine", "versions", "load_average", "compiler", "fused_kernel"):
        assert prov[key] not in (None, "", []), key
    assert prov["load_average"]["before"] and prov["load_average"]["after"]
    assert prov["dtype"] == "float32,bfloat16" and prov["torch_threads"] == 1
    assert [(r["dtype"], r["case"]) for r in data["rows"]] == [
        ("float32", "tiny B=2 S=1k"),
        ("bfloat16", "tiny B=2 S=1k"),
    ]
    for row in data["rows"]:
        assert row["read_gbps"] > 0 and row["copy_gbps"] > 0
        assert {"gqa torch split-KV (previous path)", "grouped matmul", "sdpa enable_gqa"} <= set(row["peers"])
        for name, m in row["peers"].items():
            assert m["best_s"] <= m["median_s"] and m["gbps"] > 0, name
            # every peer computed the same attention (bf16: the grouped matmul rounds P to bf16)
            assert m["max_abs_diff_to_grouped_matmul"] < (2e-2 if row["dtype"] == "bfloat16" else 1e-4), name
        if "gqa fused C++" in row["peers"]:
            assert set(row["goals_met"]) == {"of_read_bw", "x_grouped_matmul", "x_sdpa_enable_gqa"}
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Goals" in md and "load average" in md


def test_cpu_decode_bad_input_is_one_line(tmp_path):
    for args, match in ((["--dtypes", "float16"], "unknown dtype"), (["--rounds", "0"], "--rounds must be >= 1")):
        result = runner.invoke(app, ["bench", "cpu-decode", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0], result.output


def test_recorded_results_are_replaced_only_with_force(tiny_cases, tmp_path, monkeypatch):
    args = ["bench", "attention", "--quick", "--no-flex", "--min-time", "0", "--max-iters", "1", "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    ran = []
    real_run = bench.run_attention_bench
    monkeypatch.setattr(bench, "run_attention_bench", lambda **kw: ran.append(1) or real_run(**kw))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and not ran  # refused before the run, not after it
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "exists" in lines[0] and "--force" in lines[0], result.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0 and ran, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_cpu_decode_results_are_replaced_only_with_force(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "CPU_DECODE_CASES", (("tiny B=1 S=1k", 1, 1024),))
    results = bench.run_cpu_decode_bench(dtypes=("float32",), rounds=1, threads=1, progress=False)
    paths = bench.write_cpu_decode_results(results, tmp_path)
    with pytest.raises(bench.GQAUserError, match="pass --force"):
        bench.write_cpu_decode_results(results, tmp_path)
    assert bench.write_cpu_decode_results(results, tmp_path, force=True) == paths


def test_default_out_is_git_ignored():
    from gqa.cli import bench as cli_bench

    assert cli_bench.DEFAULT_RESULTS == "results"  # /results/ in .gitignore; benchmarks/results/ is tracked
