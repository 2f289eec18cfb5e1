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


def _import_time_graph() -> dict[str, set[str]]:
    """gqa module -> the gqa modules its module-level import statements run (static ``ast`` parse; imports inside
    functions and ``if __name__ == "__main__"`` blocks do not run on import). Importing ``gqa.a.b`` also runs
    the package ``gqa.a``."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src"
    files = {}
    for f in (root / "gqa").rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    def imported(stmts, mod: str, is_pkg: bool):
        for s in stmts:
            if isinstance(s, ast.Import):
                yield from (a.name for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                base = s.module or ""
                if s.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - s.level + 1] + ([base] if base else []))
                yield from (f"{base}.{a.name}" for a in s.names)
            elif isinstance(s, ast.If) and "__main__" not in ast.unparse(s.test):
                yield from imported(s.body + s.orelse, mod, is_pkg)
            elif isinstance(s, ast.Try):
                yield from imported(
                    s.body + [x for h in s.handlers for x in h.body] + s.orelse + s.finalbody, mod, is_pkg
                )

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        for name in imported(ast.parse(f.read_text()).body, mod, f.name == "__init__.py"):
            target = resolve(name) if name.startswith("gqa") else None
            while target and target != "gqa":
                if target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
                target = target.rpartition(".")[0]
    return graph


def test_no_import_cycles():
    """Module-level imports form no cycle (a cycle means a half-initialised module on some import order)."""
    graph = _import_time_graph()
    assert "gqa.formats.spec" in graph and "gqa.model.config" in graph["gqa.formats.spec"]  # the parse sees imports
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
