"""gqa.provenance: the one schema and date format every results file carries."""

from __future__ import annotations

import datetime as dt

from gqa.provenance import load_average, provenance, provenance_markdown


def test_schema_date_and_load():
    before = load_average()
    p = provenance("gqa bench x", "bfloat16", load_before=before, device="cpu")
    assert {"date", "command", "git_commit", "machine", "platform", "dtype", "versions", "load_average"} <= set(p)
    when = dt.datetime.fromisoformat(p["date"])  # ISO 8601 with an explicit UTC offset
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 600
    assert p["command"] == "gqa bench x" and p["dtype"] == "bfloat16" and p["device"] == "cpu"
    assert p["load_average"]["before"] == before and len(p["load_average"]["after"]) == 3
    assert {"python", "torch", "gqa", "transformers"} <= set(p["versions"])
    md = provenance_markdown(p)
    assert f"- date: {p['date']}" in md and "load average" in md and "- device: cpu" in md
