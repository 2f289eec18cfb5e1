"""Gemma-3 through gqa's readers and writers: a transformers folder both ways, a GGUF both ways (gqa's
reader and transformers' read the same file), each against transformers' ``Gemma3ForCausalLM``."""

from __future__ import annotations

import pytest
import torch
import transformers

from gqa.errors import GQAUserError
from gqa.model import GQAForCausalLM, load_model

# llama.cpp's gemma3 pattern: every 6th layer global, RoPE base 10,000 on the others
TYPES = ["sliding"] * 5 + ["global"]


def tiny_gemma3(types=TYPES, local_theta=1e4, seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=len(types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, sliding_window=4, max_position_embeddings=64,
        query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0, layer_types=[f"{'sliding' if t == 'sliding' else 'full'}_attention" for t in types],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm scales: the (1 + w) convention is exercised
                p.normal_(0.0, 0.3)
    return model


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))  # longer than the window


@pytest.fixture
def folder(tmp_path):
    hf = tiny_gemma3()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_folder_loads_as_gqa_with_the_same_logits(folder):
    hf, path = folder
    ours = load_model(path)
    assert isinstance(ours, GQAForCausalLM)
    c = ours.config
    assert (c.attention_kinds, c.sliding_window, c.rope_local_theta, c.rope_theta) == (TYPES, 4, 1e4, 1e6)
    assert (c.hidden_act, c.sandwich_norm, c.qk_norm, c.attn_scale) == ("gelu_tanh", True, True, 16**-0.5)
    torch.testing.assert_close(_logits(ours, IDS), _logits(hf, IDS), atol=2e-5, rtol=1e-4)


def test_saved_folder_loads_in_transformers(folder, tmp_path):
    from gqa.formats.transformers import save_hf

    hf, path = folder
    ours = load_model(path)
    saved = save_hf(ours, tmp_path / "again")
    back = transformers.AutoModelForCausalLM.from_pretrained(saved, attn_implementation="sdpa").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(_logits(back, IDS), _logits(hf, IDS), atol=2e-5, rtol=1e-4)


def test_gguf_round_trip_is_exact_and_transformers_reads_it(tmp_path):
    pytest.importorskip("gguf")
    from gqa.formats.gguf import export_gguf, load_gguf, read_gguf_header
    from gqa.formats.transformers import from_transformers

    # transformers' GGUF reader takes Gemma-3's query scale as 256 ** -0.5 (the released models' head width;
    # llama.cpp uses 1/sqrt(head_dim)): with heads of 256 both readers agree
    hf = tiny_gemma3(head_dim=256)
    ours = from_transformers(hf)
    file = export_gguf(ours, tmp_path / "g" / "m.gguf", dtype="f32")
    assert read_gguf_header(file).arch == "gemma3"
    again = load_gguf(file)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert again.config.attention_kinds == TYPES and again.config.sliding_window == 4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    torch.testing.assert_close(_logits(theirs, IDS), _logits(hf, IDS), atol=2e-5, rtol=1e-4)


def test_gguf_export_refuses_a_layer_pattern_llama_cpp_cannot_express(tmp_path):
    pytest.importorskip("gguf")
    from gqa.formats.gguf import export_gguf
    from gqa.formats.transformers import from_transformers

    ours = from_transformers(tiny_gemma3(types=["sliding", "global"] * 3))
    with pytest.raises(GQAUserError, match="every 6th layer global"):
        export_gguf(ours, tmp_path / "m.gguf", dtype="f32")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_scaled_rope_is_refused_in_one_line():
    from gqa.formats.transformers import config_from_hf

    cfg = tiny_gemma3().config.to_dict()
    cfg["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    with pytest.raises(GQAUserError, match="plain RoPE"):
        config_from_hf(cfg)


def test_paged_scheduler_gives_the_ring_buffer_caches_tokens():
    """The static cache keeps ring buffers on sliding layers; the paged one keeps every token and masks."""
    import gqa
    from gqa.formats.transformers import from_transformers
    from gqa.generation import ContinuousBatcher

    model = from_transformers(tiny_gemma3())
    prompts = [[1, 5, 9, 2, 7, 7, 3], [7, 3]]  # past the window of 4 and inside it
    static = gqa.generate(model, prompts, max_new_tokens=12, eos_token_id=None)
    server = ContinuousBatcher(model, num_pages=16, page_size=4)
    ids = [server.submit(p, max_new_tokens=12) for p in prompts]
    while server.has_work:
        server.step()
    assert [server.done[i].tokens for i in ids] == static.tokens


def test_full_rank_latent_of_gemma3_matches_transformers_and_loads_back(folder, tmp_path):
    """A Gemma-3 folder made latent at full rank (every dim rotated, the latent holds V; the layer keeps the
    QK-norm, each head's key scale cached) gives transformers' logits, cached and saved; DeepSeek-V2's
    layout (no key norm) is refused in one line."""
    from gqa.convert.calibrated.latent import latent_model, max_latent_rank
    from gqa.convert.calibrated.stats import collect_statistics
    from gqa.formats.deepseek2 import check_deepseek2
    from gqa.model.checkpoint import save_gqa_model

    hf, path = folder
    ours = load_model(path, dtype=torch.float64).eval()
    stats = collect_statistics(ours, torch.randint(0, 97, (4, 16)), progress=False, attention_sequences=2)
    new, _ = latent_model(ours, stats, [max_latent_rank(16, 2, 16)] * 6, 16)
    new = new.double().eval()
    want = _logits(ours, IDS)  # gqa's own Gemma-3, float64 (RoPE angles fp32 in both)
    torch.testing.assert_close(_logits(new, IDS), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_logits(new, IDS), _logits(hf.double(), IDS), atol=2e-5, rtol=1e-4)
    cache = new.make_cache(2, 11, dtype=torch.float64)
    steps = torch.cat([new(IDS[:, :6], cache=cache)] + [new(IDS[:, i : i + 1], cache=cache) for i in range(6, 11)], 1)
    torch.testing.assert_close(steps, want, atol=1e-9, rtol=1e-9)
    save_gqa_model(new, tmp_path / "latent", side_files_from=None)
    back = load_model(tmp_path / "latent", dtype=torch.float64)
    assert back.config.qk_norm and back.config.latent_rank == 32
    torch.testing.assert_close(_logits(back, IDS), want, atol=1e-9, rtol=1e-9)
    with pytest.raises(GQAUserError, match="DeepSeek-V2 files cannot hold"):
        check_deepseek2(new)
