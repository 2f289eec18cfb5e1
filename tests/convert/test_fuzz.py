"""Fuzz `gqa convert` over safetensors headers and config.json values (issue 12's deliverable).

Whatever hypothesis writes into a source folder, the command either exits 0 with an OUT whose files open
(every safetensors tensor readable, config.json an object), or exits 2 with one line; never a traceback,
never a hang (pytest timeout), never a file written or changed outside OUT.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gqa.cli import app
from helpers import CONFIG_KEYS, ENTRY_EDITS, JSON_VALUES, build, corrupt_copy, digest, save

runner = CliRunner()
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    save(build("llama", n_kv=4, layers=2), folder)
    return folder


@pytest.mark.timeout(300)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config_edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, max_size=2),
    header_edits=st.lists(st.tuples(st.integers(0, 10_000), ENTRY_EDITS), max_size=2),
    entry_replacement=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), JSON_VALUES)),
    kv_heads=st.sampled_from(["1", "2", "4", "8"]),
)
def test_convert_never_crashes_or_writes_outside_out(pristine, config_edits, header_edits, entry_replacement, kv_heads):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "m"
        corrupt_copy(pristine, src, config_edits, header_edits, entry_replacement)
        before = digest(root)
        r = runner.invoke(app, ["convert", str(src), str(root / "out"), "--kv-heads", kv_heads])
        if r.exit_code == 0:
            from safetensors import safe_open

            out = root / "out"
            assert isinstance(json.loads((out / "config.json").read_text()), dict)
            for f in out.glob("*.safetensors"):
                with safe_open(str(f), "pt") as sf:
                    for name in sf.keys():
                        sf.get_tensor(name)
            assert sorted(p.name for p in root.iterdir()) == ["m", "out"]
        else:
            assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
            assert sorted(p.name for p in root.iterdir()) == ["m"]
        assert {k: v for k, v in digest(root).items() if not k.startswith("out")} == before
