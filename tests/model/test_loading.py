"""gqa.model.loading: every format loads with its weights checked, folders with code are refused, nothing is
downloaded, and transformers' own load reports stay silent."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from gqa import GQAConfig, GQAForCausalLM
from gqa.errors import GQAUserError
from gqa.model.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gqa.model.loading import check_no_remote_code, load_model, load_model_tokenizer, model_context


def tiny_gpt2(folder, **over):
    """A tiny transformers model of a family gqa does not convert (it loads through AutoModelForCausalLM)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, **over)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def test_transformers_family_loads_and_matches(tmp_path):
    ref = tiny_gpt2(tmp_path / "g")
    model = load_model(tmp_path / "g")
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert model_context(model) == 32


def test_transformers_weights_that_do_not_match_are_refused_silently(tmp_path, capfd):
    tiny_gpt2(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["n_layer"] = 3  # a layer the weights do not have: transformers would initialise it randomly
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    with pytest.raises(GQAUserError, match="do not match"):
        load_model(tmp_path / "g")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no load report, no bars before the refusal


def test_pickled_weights_are_not_loaded(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g", safe_serialization=False)
    for f in (tmp_path / "g").glob("*.safetensors"):
        f.unlink()
    (tmp_path / "g" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(GQAUserError):
        load_model(tmp_path / "g")


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json", "py-file"])
def test_folders_with_code_are_refused(tmp_path, where):
    folder = tmp_path / "m"
    tiny_gpt2(folder)
    if where == "py-file":
        (folder / "modeling_x.py").write_text("raise SystemExit('ran')\n")
    else:
        path = folder / where
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
        path.write_text(json.dumps(data))
    with pytest.raises(GQAUserError, match="never runs code"):
        check_no_remote_code(folder)
    with pytest.raises(GQAUserError, match="never runs code"):
        load_model(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(GQAUserError, match="never runs code"):
        load_model_tokenizer(folder)


def test_missing_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GQAUserError, match="does not exist"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(GQAUserError, match="does not exist"):
        load_model_tokenizer("gpt2")


def _checkpoint(tmp_path, **model_state_over):
    cfg = GQAConfig(vocab_size=31, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=32)
    model = GQAForCausalLM(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(model_state_over)
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"model_config": cfg.to_dict(), "model": state, "step": 3})
    return model


def test_training_checkpoint_round_trip(tmp_path):
    model = _checkpoint(tmp_path)
    loaded = load_model(tmp_path)  # the folder of an unfinished run
    ids = torch.randint(0, 31, (1, 5))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3


@pytest.mark.parametrize(
    "over,needle",
    [({"layers.0.attn.k_proj.weight": torch.zeros(3, 16)}, "shape"), ({"extra.weight": torch.zeros(1)}, "unexpected")],
)
def test_checkpoint_weights_must_match_its_config(tmp_path, over, needle):
    _checkpoint(tmp_path, **over)
    with pytest.raises(GQAUserError, match=needle):
        load_model(tmp_path / CHECKPOINT_NAME)


def test_damaged_checkpoint_is_one_line(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(GQAUserError, match="corrupt"):
        load_model(tmp_path / CHECKPOINT_NAME)


def test_per_layer_gguf_loads_for_eval_and_generate(tmp_path):
    """A per-layer GGUF (architecture ``deci``, which transformers cannot read) loads through gqa's own reader,
    with its tokenizer, so ``gqa eval`` and ``gqa generate`` run on it and agree with the folder it came from."""
    from pathlib import Path

    from typer.testing import CliRunner

    from gqa.cli import app
    from gqa.formats.gguf import export_gguf
    from gqa.model import save_hf

    asset = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"  # BPE tokenizer
    torch.manual_seed(0)
    cfg = GQAConfig(
        vocab_size=2048, d_model=64, n_layers=3, n_heads=4, n_kv_heads=[2, 1, 4], ffn_dim=96, max_seq_len=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    m = GQAForCausalLM(cfg).eval()
    folder = save_hf(m, tmp_path / "folder", side_files_from=asset)
    path = export_gguf(m, tmp_path / "var.gguf", tokenizer_dir=folder, dtype="f32")
    loaded = load_model(path)
    assert loaded.config.kv_heads_per_layer == [2, 1, 4]
    ids = torch.tensor([[5, 900, 17, 2000, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), m(ids), rtol=0, atol=0)  # f32 round trip is exact
    text = "To be, or not to be: that is the question. 1599 <|endoftext|> Ophelia's"
    assert load_model_tokenizer(path)(text)["input_ids"] == load_model_tokenizer(folder)(text)["input_ids"]

    (tmp_path / "text.txt").write_text(text * 4)
    runner = CliRunner()
    scores = []
    for model in (path, folder):
        r = runner.invoke(app, ["eval", str(model), "--data", str(tmp_path / "text.txt"), "--seq-len", "32", "--json"])
        assert r.exit_code == 0, r.output
        scores.append(json.loads(r.output)["perplexity"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    r = runner.invoke(app, ["generate", str(path), "-p", "To be", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
