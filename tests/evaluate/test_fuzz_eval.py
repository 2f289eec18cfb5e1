"""Fuzz `gqa eval` over safetensors headers and config.json values of a real model folder (issue 12).

Whatever hypothesis writes into the shipped model's folder, `gqa eval` either exits 0 with a finite
perplexity, or exits 2 with one line; never a traceback, never a hang (pytest timeout), and it writes
nothing anywhere (the folder and the working directory are unchanged).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gqa.cli import app
from gqa.model.assets import shipped_model_path
from helpers import CONFIG_KEYS, ENTRY_EDITS, JSON_VALUES, corrupt_copy, digest

runner = CliRunner()
TEXT = "KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our English dead.\n" * 8


@pytest.mark.timeout(300)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config_edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, max_size=2),
    header_edits=st.lists(st.tuples(st.integers(0, 10_000), ENTRY_EDITS), max_size=2),
    entry_replacement=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), JSON_VALUES)),
)
def test_eval_never_crashes_or_writes(config_edits, header_edits, entry_replacement):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "m"
        corrupt_copy(shipped_model_path(), src, config_edits, header_edits, entry_replacement)
        (root / "text.txt").write_text(TEXT)
        before = digest(root)
        r = runner.invoke(app, ["eval", str(src), "--data", str(root / "text.txt"), "--max-tokens", "64", "--json"])
        if r.exit_code == 0:
            ppl = json.loads(re.search(r"\{.*\}", r.stdout, re.S).group(0))["perplexity"]
            assert math.isfinite(ppl) and ppl > 0, r.stdout
        else:
            assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert digest(root) == before
