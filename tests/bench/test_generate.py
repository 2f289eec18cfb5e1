"""`gqa bench generate`: KV variants keep the head mapping; a tiny run writes results with provenance,
a PNG plot, and the fixed-budget batch scales with the group size; recorded results are replaced only
with --force; torch's thread count is restored."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gqa import GQAConfig, GQAForCausalLM, save_hf
from gqa.bench.generate import check_results_free, kv_variant, run_generate_bench, write_generate_results
from gqa.cli import app
from gqa.errors import GQAUserError


def test_kv_variant_pools_contiguous_groups():
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=48, max_seq_len=32)
    mha = GQAForCausalLM(cfg).eval()
    d = cfg.resolved_head_dim
    with torch.no_grad():  # make KV heads equal within each group of 4 (query head h -> KV head h // 4)
        for layer in mha.layers:
            for proj in (layer.attn.k_proj, layer.attn.v_proj):
                w = proj.weight.view(2, 4, d, -1)
                w[:] = w[:, :1]
    gqa4 = kv_variant(mha, 2)
    assert gqa4.config.kv_heads_per_layer == [2, 2]
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa4(ids), mha(ids), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(kv_variant(mha, 1)(ids), mha(ids), atol=1e-4)  # MQA pools different heads


def test_tiny_bench_run_writes_results(tmp_path):
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=48, max_seq_len=32)
    save_hf(GQAForCausalLM(cfg).eval(), tmp_path / "mha")
    threads = torch.get_num_threads()
    estimates = []
    res = run_generate_bench(  # one thread: tiny matmuls on a shared machine thrash with more
        tmp_path / "mha",
        batch_sizes=(2,),
        prompt_len=6,
        new_tokens=3,
        repeats=1,
        budget_sequences=2,
        budget_requests=12,
        page_size=4,
        progress=False,
        threads=1,
        on_estimate=estimates.append,
    )
    assert torch.get_num_threads() == threads  # restored
    assert res["torch_threads"] == 1
    assert len(estimates) == 1 and estimates[0] == res["estimated_seconds"] > 0 and res["elapsed_seconds"] > 0
    decode = res["decode"]
    assert {r["impl"] for r in decode} == {"gqa", "transformers"}
    assert all(r["decode_tokens_per_s"] > 0 for r in decode)
    kv = {(r["variant"], r["batch"], r["impl"]): r["kv_cache_bytes"] for r in decode}
    assert kv[("MHA", 2, "gqa")] == 4 * kv[("GQA (g=4)", 2, "gqa")] == 8 * kv[("MQA", 2, "gqa")]
    # transformers holds the same heads (one token fewer: the last sampled token is never cached)
    assert kv[("GQA (g=4)", 2, "transformers")] * 9 == kv[("GQA (g=4)", 2, "gqa")] * 8
    served = {r["variant"]: r["max_concurrent_sequences"] for r in res["fixed_budget"]}
    assert served["MHA"] == 2 and served["GQA (g=4)"] == 8 and served["MQA"] == 12  # capped by the 12 requests
    assert res["model"] == str(tmp_path / "mha")
    paths = write_generate_results(res, tmp_path, "generate-test", command="pytest")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    data = json.loads((tmp_path / "generate-test.json").read_text())
    assert data["provenance"]["command"] == "pytest" and data["provenance"]["versions"]["torch"]
    assert (tmp_path / "generate-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "generate-test.md").read_text()
    assert "git commit" in md and "| MQA | 1 |" in md


def test_recorded_results_are_replaced_only_with_force(tmp_path):
    assert check_results_free(tmp_path / "new", "generate-cpu") == [
        tmp_path / "new" / f"generate-cpu{suffix}" for suffix in (".json", ".md", ".png")
    ]
    (tmp_path / "generate-cpu.md").write_text("recorded")
    with pytest.raises(GQAUserError, match="--force"):
        check_results_free(tmp_path, "generate-cpu")
    check_results_free(tmp_path, "generate-cpu", force=True)
    # the command refuses before it runs anything, in one line, and leaves the recorded file alone
    res = CliRunner().invoke(app, ["bench", "generate", "--out", str(tmp_path), "--name", "generate-cpu"])
    assert res.exit_code == 2 and "--force" in res.output and res.output.count("\n") == 1
    assert (tmp_path / "generate-cpu.md").read_text() == "recorded"


def test_a_latent_model_is_benchmarked_alone_against_transformers_deepseek_v2(tmp_path):
    """A shared-rope latent model: timed in gqa and as transformers' DeepseekV2ForCausalLM, its cache the latent
    rows; no paged fixed-budget row (the paged cache holds K/V heads)."""
    from gqa.model.checkpoint import save_gqa_model

    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=1, ffn_dim=48, max_seq_len=32,
                    latent_rank=6, latent_rope_dim=2)  # fmt: skip
    save_gqa_model(GQAForCausalLM(cfg).eval(), tmp_path / "latent")
    res = run_generate_bench(tmp_path / "latent", batch_sizes=(2,), prompt_len=6, new_tokens=3, repeats=1,
                             budget_sequences=2, budget_requests=4, page_size=4, progress=False, threads=1)  # fmt: skip
    rows = {r["impl"]: r for r in res["decode"]}
    assert set(rows) == {"gqa", "transformers"} and rows["gqa"]["variant"].startswith("latent (R=6, r=2")
    assert rows["gqa"]["kv_cache_bytes"] == 2 * 2 * (6 + 2) * 9 * 4  # layers x batch x values x tokens x fp32
    assert res["fixed_budget"] == []
    write_generate_results(res, tmp_path, "latent-test", command="pytest")
    assert "latent (R=6" in (tmp_path / "latent-test.md").read_text()
