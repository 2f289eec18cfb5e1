"""DeepSeek-V2 exports of a latent model: transformers' DeepseekV2ForCausalLM (no custom code) computes what gqa
does, the GGUF holds llama.cpp's deepseek2 tensors (its converter's split of the same weights), and what the
layout cannot hold is refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gqa.convert.calibrated.latent import latent_model
from gqa.convert.calibrated.stats import collect_statistics
from gqa.errors import GQAUserError
from gqa.formats.deepseek2 import deepseek2_rope_theta, hf_tensors, save_deepseek_v2
from gqa.model import GQAConfig, GQAForCausalLM
from helpers import tiny_gqa

transformers = pytest.importorskip("transformers")


def _shared_latent(rope_dim=4, rank=12, **kw):
    """A tiny GQA model (2 KV groups, D = 8) converted to a latent with one shared rotated head."""
    model = tiny_gqa(n_kv=2, **kw)
    ids = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, ids, progress=False, attention_sequences=2)
    new, _ = latent_model(model, stats, [rank] * 2, rope_dim, shared_rope=True)
    return new.eval()


def _with_latent_norm(seed=0):
    """A latent model built with its own latent norm (eps 1e-6, as transformers' kv_a_layernorm), random weights."""
    torch.manual_seed(seed)
    cfg = GQAConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=8, n_kv_heads=1, ffn_dim=96, max_seq_len=96,
                    latent_rank=10, latent_rope_dim=4, latent_norm=True, norm_eps=1e-6)  # fmt: skip
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.15)
    return model


def _hf(model, folder):
    save_deepseek_v2(model, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    return hf


@pytest.mark.parametrize("build", [_shared_latent, _with_latent_norm], ids=["converted-no-norm", "latent-norm"])
def test_transformers_computes_what_gqa_does(tmp_path, build):
    model = build()
    hf = _hf(model, tmp_path / "ds")
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    scale = ours.abs().max()
    torch.testing.assert_close(theirs, ours, atol=2e-5 * scale, rtol=0)
    prompt = ids[:1, :8]
    want = model.generate_greedy(prompt, 12)  # gqa's cached decoding (absorbed form over the latent cache)
    got = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)  # transformers' latent cache
    assert got.tolist() == want.tolist()


@torch.no_grad()
def test_linear_norm_is_exact_to_the_margin_on_extreme_inputs():
    """The no-norm latent's stand-in norm stays linear even for inputs at the bound (a huge residual)."""
    model = _shared_latent()
    tensors = dict(hf_tensors(model))
    block = model.layers[0]
    x = block.attn_norm(torch.randn(3, 5, 64) * 1e4)
    kv_a = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][: block.attn.rank]
    w = tensors["model.layers.0.self_attn.kv_a_layernorm.weight"]
    c = x @ kv_a.T
    normed = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(normed, block.attn.kv_down(x), rtol=1e-5, atol=1e-6 * block.attn.kv_down(x).abs().max())


def test_gguf_holds_llama_cpps_split_of_the_same_weights(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gqa.formats.gguf import export_gguf

    model = _shared_latent()
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].parts[-1][0].item()  # noqa: E731
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deepseek2"
    cfg, d, r = model.config, 8, 4
    assert field("deepseek2.attention.kv_lora_rank") == 12 and field("deepseek2.attention.q_lora_rank") == 0
    assert field("deepseek2.attention.head_count_kv") == 1 and field("deepseek2.rope.dimension_count") == r
    assert field("deepseek2.attention.key_length") == 12 + r and field("deepseek2.attention.value_length") == 12
    assert (
        field("deepseek2.attention.key_length_mla") == d
        and field("deepseek2.leading_dense_block_count") == cfg.n_layers
    )
    assert field("deepseek2.rope.freq_base") == pytest.approx(deepseek2_rope_theta(model), rel=1e-6)
    got = {t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    hf = dict(hf_tensors(model))
    for i in range(cfg.n_layers):
        kv_b = hf[f"model.layers.{i}.self_attn.kv_b_proj.weight"].view(8, 2 * d - r, 12)
        torch.testing.assert_close(got[f"blk.{i}.attn_k_b.weight"], kv_b[:, : d - r].transpose(1, 2))
        torch.testing.assert_close(got[f"blk.{i}.attn_v_b.weight"], kv_b[:, d - r :])
        for ours, theirs in (
            ("q_proj", "attn_q"),
            ("kv_a_proj_with_mqa", "attn_kv_a_mqa"),
            ("kv_a_layernorm", "attn_kv_a_norm"),
            ("o_proj", "attn_output"),
        ):
            torch.testing.assert_close(got[f"blk.{i}.{theirs}.weight"], hf[f"model.layers.{i}.self_attn.{ours}.weight"])
        torch.testing.assert_close(got[f"blk.{i}.ffn_gate.weight"], hf[f"model.layers.{i}.mlp.gate_proj.weight"])
    assert "blk.0.attn_k.weight" not in got and len(got) == 2 + cfg.n_layers * 11 + (0 if cfg.tie_embeddings else 1)


def test_float16_gguf_keeps_the_scaled_down_projection_in_f32(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gqa.formats.gguf import export_gguf

    path = export_gguf(_shared_latent(), tmp_path / "m.gguf", dtype="f16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_kv_a_mqa.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"


def test_what_the_layout_cannot_hold_is_refused_in_one_line(tmp_path):
    per_group = tiny_gqa(n_kv=2)
    ids = torch.randint(0, 97, (4, 16))
    stats = collect_statistics(per_group, ids, progress=False, attention_sequences=0)
    grouped, _ = latent_model(per_group, stats, [12] * 2, 4)
    cases = [
        (grouped, None, "one rotated key head"),
        (per_group, None, "has KV heads"),
        (_shared_latent(rope_dim=8, rank=8), None, "rotated dims"),
        (_shared_latent(), torch.float16, "float16"),
    ]
    spread = _shared_latent()
    spread.layers[1].attn.rope_pairs.copy_(torch.tensor([[0, 3]]))  # another stride in one layer
    cases.append((spread, None, "evenly spaced"))
    for model, dtype, needle in cases:
        with pytest.raises(GQAUserError, match=needle) as err:
            save_deepseek_v2(model, tmp_path / "x", dtype=dtype)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "x").exists()
    ranks = dataclasses.replace(spread.config, latent_rank=[12, 10])
    with pytest.raises(GQAUserError, match="one latent rank"):
        save_deepseek_v2(GQAForCausalLM(ranks), tmp_path / "x")


def test_gqa_memory_counts_the_exported_folders_latent_cache(tmp_path):
    """An MLA config.json (ours or DeepSeek's) is sized by its latent rows, not by num_key_value_heads."""
    from helpers import gqa_cli

    model = _shared_latent()
    save_deepseek_v2(model, tmp_path / "ds")
    res = gqa_cli(["memory", tmp_path / "ds", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout)["kv_bytes_per_token"] == model.config.kv_bytes_per_token(torch.bfloat16) == 2 * (12 + 4) * 2
