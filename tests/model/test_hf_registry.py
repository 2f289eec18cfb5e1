"""Per-layer KV-head checkpoints load through transformers' AutoModelForCausalLM after the one documented
line ``gqa.register_transformers()``, and transformers' ``generate()`` runs on them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gqa
from gqa import GQAConfig, GQAForCausalLM, save_hf


def per_layer_model() -> GQAForCausalLM:
    torch.manual_seed(0)
    cfg = GQAConfig(
        vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=[4, 2, 1], head_dim=8, ffn_dim=48, max_seq_len=64
    )
    return GQAForCausalLM(cfg).eval()


def test_auto_model_loads_a_per_layer_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    gqa.register_transformers()

    model = per_layer_model()
    save_hf(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(hf).__name__ == "GQAModelForCausalLM"
    assert [layer.attn.n_kv_heads for layer in hf.gqa_model.layers] == [4, 2, 1]
    ids = torch.randint(0, 61, (2, 10))
    out = hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, model(ids), rtol=0, atol=0)
    expected = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_uniform_checkpoints_still_load_as_transformers_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    gqa.register_transformers()

    cfg = GQAConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48)
    model = GQAForCausalLM(cfg).eval()
    save_hf(model, tmp_path / "uniform")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    assert type(hf).__name__ == "LlamaForCausalLM" and type(hf).__module__.startswith("transformers.")
    ids = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    small = LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert type(AutoModelForCausalLM.from_config(small)).__module__.startswith("transformers.")


def test_registration_in_a_fresh_interpreter(tmp_path):
    """In a fresh interpreter: `import gqa`, then transformers' Auto class, as a user would."""
    save_hf(per_layer_model(), tmp_path / "out")
    code = (
        "import gqa\n"
        "gqa.register_transformers()\n"
        "gqa.register_transformers()  # idempotent\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("GQAModelForCausalLM")


def test_transformers_generate_on_a_per_layer_checkpoint(tmp_path):
    """transformers' generate() (greedy) gives the tokens of gqa's own cached greedy decoding."""
    from transformers import AutoModelForCausalLM

    gqa.register_transformers()
    model = per_layer_model()
    model.config.eos_token_id = None  # run the full length so every step is compared
    save_hf(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 61, (2, 5))
    out = hf.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate_greedy(ids, 7))


def test_transformers_generate_with_left_padding(tmp_path):
    """A left-padded row generates what it generates alone (RoPE positions count real tokens only)."""
    from transformers import AutoModelForCausalLM

    gqa.register_transformers()
    model = per_layer_model()
    model.config.eos_token_id = None
    save_hf(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    short = torch.randint(3, 61, (1, 4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = hf.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 3:], model.generate_greedy(short, 5))


def test_per_layer_loader_refuses_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    from gqa.errors import GQAUserError

    gqa.register_transformers()
    save_hf(per_layer_model(), tmp_path / "out")
    with pytest.raises(GQAUserError, match="never runs code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)


def test_read_per_layer_heads(tmp_path):
    from gqa.hf_registry import read_per_layer_heads

    save_hf(per_layer_model(), tmp_path / "v")
    assert read_per_layer_heads(tmp_path / "v") == [4, 2, 1]
    save_hf(GQAForCausalLM(GQAConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)), tmp_path / "u")
    assert read_per_layer_heads(tmp_path / "u") is None
