"""gqa.atomic (temp-then-rename writing) and gqa.units (dtype names, KV bytes per token)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from gqa.atomic import atomic_dir, atomic_file, clean_stale_partials, write_json_atomic
from gqa.errors import GQAUserError
from gqa.units import dtype_name, element_size, kv_bytes_per_token, parse_dtype


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_atomic_outputs_get_umask_permissions_not_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_atomic_dir_refuses_existing_and_replaces_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    with pytest.raises(GQAUserError, match="exists"), atomic_dir(out):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, force=True) as d:
        (d / "new").write_text("2")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old"]  # an interrupted build leaves OUT as it was
    with atomic_dir(out, force=True) as d:
        (d / "new").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_clean_stale_partials_removes_only_leftovers_of_that_target(tmp_path):
    (tmp_path / ".out.partial-abc").mkdir()
    (tmp_path / ".out.tmp-1").write_text("")
    (tmp_path / ".other.partial-x").mkdir()
    removed = clean_stale_partials(tmp_path / "out")
    assert sorted(p.name for p in removed) == [".out.partial-abc", ".out.tmp-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x"]


@pytest.mark.parametrize(
    "name, dtype",
    [("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("FP32", torch.float32), (torch.float64, torch.float64)],
)
def test_parse_dtype_names_and_aliases(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_refuses_unknown_and_disallowed_names_in_one_line():
    with pytest.raises(GQAUserError, match="unknown dtype 'int7'; choose one of"):
        parse_dtype("int7")
    with pytest.raises(GQAUserError, match="float64 is not supported here; choose one of float32, bfloat16"):
        parse_dtype("fp64", allowed=("float32", "bfloat16"))
    assert parse_dtype(None) is None


def test_kv_bytes_per_token_matches_the_formula_on_known_models():
    # 2 x layers x Hkv x head_dim x bytes: Llama-2-7B bf16 (MHA) 512 KiB, Llama-3-8B 128 KiB, per-layer heads summed.
    assert kv_bytes_per_token([32] * 32, 128, torch.bfloat16) == 512 * 1024
    assert kv_bytes_per_token([8] * 32, 128, "bfloat16") == 128 * 1024
    assert kv_bytes_per_token([4, 2, 1], 32, "float32") == 2 * 7 * 32 * 4
    assert element_size("fp16") == 2 and dtype_name(torch.bfloat16) == "bfloat16"


def test_parse_device_accepts_cpu_and_refuses_what_this_machine_lacks_in_one_line():
    from gqa.units import parse_device

    assert parse_device("cpu") == torch.device("cpu") and parse_device(None) is None
    with pytest.raises(GQAUserError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    with pytest.raises(GQAUserError, match="not supported"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(GQAUserError, match="needs a CUDA GPU"):
            parse_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_uptrain_on_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from gqa.model.assets import shipped_model_path

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from gqa.cli import main; sys.argv[0] = 'gqa'; main()", "uptrain",
         str(shipped_model_path()), str(out), "--data",
         str(shipped_model_path() / "config.json"), "--tokens", "100", "--device", "cuda"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "needs a CUDA GPU" in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
