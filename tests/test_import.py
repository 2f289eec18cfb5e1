"""`import gqa` stays light: no transformers, matplotlib or safetensors at import time (checked in a fresh
interpreter, since this test process has imported them already)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "matplotlib", "safetensors", "huggingface_hub", "tokenizers", "gguf", "triton", "tqdm")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_import_gqa_is_light():
    mods = _modules_after("import gqa")
    assert _heavy(mods) == []
    assert "torch" not in mods  # the root re-exports are lazy
    assert [m for m in mods if m.startswith("gqa.")] == []


def test_root_names_import_on_use_without_transformers():
    mods = _modules_after(
        "import gqa\n"
        "cfg = gqa.GQAConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=16)\n"
        "gqa.GQAForCausalLM(cfg); gqa.attention; gqa.masks.causal(); gqa.generate; gqa.KVCache; gqa.load_model\n"
        "assert 'register_transformers' in dir(gqa) and gqa.__version__\n"
    )
    assert "torch" in mods
    assert [m for m in _heavy(mods) if m.split(".")[0] in ("transformers", "matplotlib")] == []


def test_unknown_root_attribute_is_an_attribute_error():
    import gqa

    try:
        gqa.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("gqa.no_such_name did not raise")


def test_cli_startup_does_not_import_transformers_or_matplotlib():
    """What `gqa --help` pays for: the command modules register without their heavy imports."""
    mods = _modules_after("import gqa.cli")
    assert [m for m in _heavy(mods) if m.split(".")[0] in ("transformers", "matplotlib", "gguf", "triton")] == []
