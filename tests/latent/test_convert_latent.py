"""``gqa convert --kv-latent``: a latent checkpoint that gqa loads, evaluates and sizes; bad options refused
in one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gqa.convert import convert
from gqa.errors import GQAUserError
from gqa.model import load_model
from helpers import assert_one_line_refusal, gqa_cli

MHA = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"


def test_latent_conversion_writes_a_model_gqa_runs(tmp_path):
    out = tmp_path / "out"
    report = convert(MHA, out, kv_latent=40, latent_rope_dim=8, calib="shakespeare:train", calib_tokens=4096,
                     distill="local", distill_steps=20, progress=False)  # fmt: skip
    assert report.layout == "latent" and report.export == "gqa"
    layers = report.distill["layers"]  # local distillation fits latent layers with the same code
    assert len(layers) == 4 and all(la["error_after"] <= la["error_before"] for la in layers)
    assert len(report.latent["layers"]) == 4 and all(0 < f["kv_energy_kept"] <= 1 for f in report.latent["layers"])
    model = load_model(out)
    assert model.config.latent_rank == 40 and model.config.latent_rope_dim == 8
    assert (
        report.kv_cache_bytes_per_token_after == model.config.kv_bytes_per_token(torch.float32) == 4 * (40 + 8 * 8) * 4
    )
    saved = json.loads((out / "gqa_config.json").read_text())
    assert saved["latent_rank"] == 40
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = model.make_cache(2, 12)
    torch.testing.assert_close(torch.cat([model(ids[:, :8], cache=cache), model(ids[:, 8:], cache=cache)], 1), model(ids),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    res = gqa_cli(["memory", out, "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kv_bytes_per_token"] == 4 * (40 + 8 * 8) * 2  # bf16
    # end-to-end distillation moves the latent's own parameters (--train kv) and writes a latent model
    up = tmp_path / "up"
    res = gqa_cli(["uptrain", out, up, "--teacher", MHA, "--tokens", "512", "--seq-len", "64", "--batch-size", "2",
                   "--train", "kv", "--lr", "1e-2"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    trained = load_model(up)
    assert trained.config.latent_rank == 40
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, model.get_parameter(n))}
    assert moved and all(n.split(".")[-2] in ("kv_down", "k_rope_proj", "k_up", "v_up") for n in moved), sorted(moved)[
        :4
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kv-latent", "40"], "needs --calib"),
        (["--kv-latent", "40", "--kv-heads", "2", "--calib", "shakespeare:train"], "drop --kv-heads"),
        (
            [
                "--kv-latent",
                "40",
                "--kv-budget",
                "0.3",
                "--latent-rope",
                "shared",
                "--export",
                "hf",
                "--calib",
                "shakespeare:train",
            ],
            "cannot hold",
        ),
        (["--kv-latent", "40", "--kv-budget", "2", "--calib", "shakespeare:train"], "fraction"),
        (["--kv-latent", "40", "--export", "hf", "--calib", "shakespeare:train"], "--export gqa"),
        (["--kv-latent", "40", "--latent-rope-dim", "3", "--calib", "shakespeare:train"], "even"),
        (["--kv-latent", "4000", "--calib", "shakespeare:train", "--calib-tokens", "1024"], "use 1 to"),
        (
            [
                "--kv-latent",
                "8",
                "--latent-rope-dim",
                "64",
                "--calib",
                "shakespeare:train",
                "--calib-tokens",
                "1024",
            ],
            "more than the head",
        ),
    ],
)
def test_bad_latent_options_are_refused_in_one_line(tmp_path, args, needle):
    res = gqa_cli(["convert", MHA, tmp_path / "out", *args], tmp_path)
    assert_one_line_refusal(res, needle)
    assert not (tmp_path / "out").exists()


def test_shared_rope_latent_exports_as_deepseek_v2_that_transformers_runs(tmp_path):
    """--latent-rope shared --export hf writes DeepseekV2ForCausalLM; it computes what the same conversion
    written as --export gqa computes in gqa."""
    transformers = pytest.importorskip("transformers")
    common = ["--kv-latent", "24", "--latent-rope-dim", "4", "--latent-rope", "shared", "--calib", "shakespeare:train",
              "--calib-tokens", "2048", "--distill", "none"]  # fmt: skip
    for export in ("hf", "gqa"):
        res = gqa_cli(["convert", MHA, tmp_path / export, *common, "--export", export], tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "hf" / "conversion_report.json").read_text())
    assert report["latent"]["rope"] == "shared" and report["kv_heads_after"] == [1] * 4
    ours = load_model(tmp_path / "gqa")
    assert ours.config.kv_values_per_token() == [24 + 4] * 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours.float()(ids), hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    # gqa reads the DeepSeek-V2 folder back (latent layers, the file's latent norm) and writes it again
    back = load_model(tmp_path / "hf")
    assert back.config.latent_norm and back.config.kv_values_per_token() == [24 + 4] * 4
    with torch.no_grad():
        torch.testing.assert_close(back(ids), got, atol=1e-5 * got.abs().max().item(), rtol=0)
        cache = back.make_cache(2, 20)
        steps = torch.cat([back(ids[:, :12], cache=cache)] + [back(ids[:, i : i + 1], cache=cache) for i in range(12, 20)], 1)
        torch.testing.assert_close(steps, got, atol=1e-5 * got.abs().max().item(), rtol=0)
    from gqa.formats.transformers import save_hf

    save_hf(back, tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got, atol=1e-5 * got.abs().max().item(), rtol=0)
    from gqa.formats.gguf import export_gguf

    assert back.config.norm_eps != back.config.latent_norm_eps  # 1e-5 in the source, 1e-6 for transformers' latent norm
    with pytest.raises(GQAUserError, match="llama.cpp's deepseek2 normalises the latent"):
        export_gguf(back, tmp_path / "back.gguf")
    assert not (tmp_path / "back.gguf").exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value, needle in [("q_lora_rank", 8, "q_lora_rank"), ("first_k_dense_replace", 0, "experts"),
                               ("v_head_dim", 8, "v_head_dim"), ("kv_lora_rank", 20, "shape")]:  # fmt: skip
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(GQAUserError, match=needle):
            load_model(tmp_path / "hf")


def test_a_budget_spends_the_latent_ranks_where_the_measured_error_is(tmp_path):
    """--kv-latent R --kv-budget F: per-layer ranks up to R from measured error curves, within F of the cache."""
    out = tmp_path / "budget"
    report = convert(MHA, out, kv_latent=64, kv_budget=0.2, latent_rope_dim=4, calib="shakespeare:train",
                     calib_tokens=2048, distill="none", progress=False)  # fmt: skip
    model = load_model(out)
    cfg, ranks = model.config, report.latent["ranks"]
    assert cfg.latent_ranks == ranks and all(r <= 64 for r in ranks) and len(set(ranks)) > 1
    original = sum(2 * h * cfg.resolved_head_dim for h in cfg.kv_heads_per_layer)
    assert sum(cfg.kv_values_per_token()) <= 0.2 * original
    curves = report.error_curves
    assert len(curves) == cfg.n_layers and all(c[str(max(map(int, c)))] <= c["8"] + 1e-9 for c in curves)
    assert sum(curves[i][str(r)] for i, r in enumerate(ranks)) <= sum(c["8"] for c in curves)


def test_choose_latent_ranks_is_the_exact_knapsack_over_cache_values():
    from gqa.convert.calibrated.latent import choose_latent_ranks

    curves = [{8: 1.0, 16: 0.2, 32: 0.1}, {8: 0.3, 16: 0.25, 32: 0.0}]
    assert choose_latent_ranks(curves, rope_values=4, max_values=2 * 4 + 16 + 32) == [16, 32]
    assert choose_latent_ranks(curves, rope_values=4, max_values=2 * 4 + 16 + 8) == [16, 8]
    with pytest.raises(GQAUserError, match="raise --kv-budget"):
        choose_latent_ranks(curves, rope_values=4, max_values=10)
