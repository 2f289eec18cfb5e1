"""experiments/recover_quality.py: every named recipe is well formed, and the report reads the old rows of
docs/results/recover-quality.json next to appended recipe rows (top-1 agreement, prompts kept)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("recover_quality", REPO / "experiments" / "recover_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_are_convert_options_or_continue_a_recipe():
    from gqa.convert import ConvertOptions

    rq = _module()
    assert {"default", "paper", "default+e2e"} <= set(rq.RECIPES)
    for name, recipe in rq.RECIPES.items():
        assert recipe["about"], name
        if "start" in recipe:
            assert recipe["start"] in rq.RECIPES and "convert" not in recipe, name
        else:  # validated exactly as the run would build them
            target = recipe.get("target", "kv1")
            goal = {"kv_heads": int(target[2:])} if target.startswith("kv") else {"kv_budget": float(target[6:])}
            ConvertOptions(**goal, **{"calib": "english:calib", **recipe["convert"]})
        if "train" in recipe:
            assert recipe["train"]["minutes"] <= 10 and isinstance(recipe["train"]["teacher"], bool), name


def test_report_reads_old_rows_and_recipe_rows(tmp_path):
    rq = _module()
    data = json.loads((REPO / "docs" / "results" / "recover-quality.json").read_text())
    old = next(r for r in data["rows"] if r["model"] == "smollm2" and r["target"] == "kv1" and r["method"] != "original")
    row = {**old, "recipe": "default", "method": "recipe default: the defaults", "wall_minutes": 14.2,
           "seconds": 800.0, "original_perplexity": 18.0, "perplexity": 21.6, "top1_agreement": 0.711,
           "prompts": [{"common_tokens": 16}, {"common_tokens": 3}]}  # fmt: skip
    data["rows"].append(row)
    rq.write(data, tmp_path)
    text = (tmp_path / "recover-quality.md").read_text()
    assert "| recipe default: the defaults |" in text and "**1.200**" in text and "71.1%" in text and "| 1 / 2 |" in text
    assert f"| {old['method']} |" in text and (tmp_path / "recover-quality.png").is_file()
