"""gqa.evaluate: perplexity and KL for gqa and transformers models, token accounting, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gqa import GQAConfig, GQAForCausalLM, save_hf
from gqa.data import train_bpe_tokenizer
from gqa.evaluate import evaluate_lm, kl_to_teacher, perplexity

VOCAB = 97


def tiny_model(n_kv_heads: int = 4, seed: int = 0) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, max_seq_len=64
    )
    return GQAForCausalLM(cfg).eval()


def test_uniform_model_has_perplexity_vocab_size():
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0 -> uniform next-token distribution
    res = perplexity(model, torch.randint(0, VOCAB, (50,)), seq_len=8, batch_size=3)
    assert res.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert res.tokens == 49


@pytest.mark.parametrize("n_tokens,seq_len", [(33, 8), (40, 8), (9, 16), (2, 4)])
def test_windows_score_every_token_once(n_tokens, seq_len):
    """Window-by-window NLL equals the sum of each window's cross-entropy computed directly."""
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (n_tokens,))
    res = perplexity(model, ids, seq_len=seq_len, batch_size=2)
    assert res.tokens == n_tokens - 1
    total = 0.0
    with torch.no_grad():
        for s in range(0, n_tokens - 1, seq_len):
            chunk = ids[s : s + seq_len + 1]
            logits = model(chunk[:-1].unsqueeze(0)).double()
            total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
    assert res.nll == pytest.approx(total / (n_tokens - 1), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(res.nll))


@pytest.mark.parametrize("n_tokens,seq_len", [(33, 8), (40, 8), (5, 16), (2, 4)])
def test_windows_after_bos_score_every_token_once_the_first_too(n_tokens, seq_len):
    """With a BOS (Gemma needs one in front of any text) each window is BOS + L-1 text tokens predicting L."""
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (n_tokens,))
    res = perplexity(model, ids, seq_len=seq_len, batch_size=2, bos_token_id=2)
    assert res.tokens == n_tokens
    total = 0.0
    with torch.no_grad():
        for s in range(0, n_tokens, seq_len):
            targets = ids[s : s + seq_len]
            inputs = torch.cat([torch.tensor([2]), targets[:-1]])
            total += F.cross_entropy(model(inputs.unsqueeze(0)).double()[0], targets, reduction="sum").item()
    assert res.nll == pytest.approx(total / n_tokens, rel=1e-5)
    assert perplexity(model, ids, seq_len=seq_len, max_tokens=1, bos_token_id=2).tokens == 1  # max_tokens holds


def test_leading_bos_is_what_the_tokenizer_puts_before_a_text(tmp_path):
    from tokenizers import processors

    from gqa.data.tokenizer import leading_bos

    tok = train_bpe_tokenizer("the cat sat on the mat " * 50, vocab_size=300)
    assert leading_bos(tok) is None
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    assert leading_bos(tok) == 0


def test_max_tokens_caps_the_scored_tokens():
    ids = torch.randint(0, VOCAB, (100,))
    model = tiny_model()
    assert perplexity(model, ids, seq_len=16, max_tokens=40).tokens == 40
    assert perplexity(model, ids, seq_len=16, max_tokens=40).nll == pytest.approx(
        perplexity(model, ids[:41], seq_len=16).nll
    )


def test_transformers_model_gives_the_same_perplexity_as_gqa(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(n_kv_heads=2)
    save_hf(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (70,))
    ours = perplexity(model, ids, seq_len=16)
    theirs = perplexity(hf, ids, seq_len=16)
    assert theirs.tokens == ours.tokens
    assert theirs.nll == pytest.approx(ours.nll, rel=1e-4)


def test_text_needs_a_tokenizer_and_is_encoded_with_it():
    text = "So foul and fair a day I have not seen. " * 20
    tok = train_bpe_tokenizer(text, vocab_size=VOCAB + 180)
    cfg = GQAConfig(vocab_size=VOCAB + 180, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=64)
    model = GQAForCausalLM(cfg).eval()
    ids = tok.encode(text).ids
    assert perplexity(model, text, tokenizer=tok).nll == pytest.approx(perplexity(model, ids).nll)
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity(model, text)


def test_kl_to_teacher():
    ids = torch.randint(0, VOCAB, (60,))
    student, teacher = tiny_model(2, seed=1), tiny_model(4, seed=2)
    assert abs(kl_to_teacher(teacher, teacher, ids, seq_len=16)) < 1e-5
    kl = kl_to_teacher(student, teacher, ids, seq_len=16)
    # KL(p || q) computed directly for the single 59-token window
    with torch.no_grad():
        p = F.log_softmax(teacher(ids[:-1].unsqueeze(0)).double(), -1)
        q = F.log_softmax(student(ids[:-1].unsqueeze(0)).double(), -1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl > 1e-3
    assert kl_to_teacher(student, teacher, ids, seq_len=59) == pytest.approx(direct, rel=1e-4)
    res = evaluate_lm(student, ids, teacher=teacher)
    assert res.kl > 0 and res.tokens == 59


def test_top1_agreement_is_the_share_of_positions_predicting_the_teachers_token():
    ids = torch.randint(0, VOCAB, (60,))
    student, teacher = tiny_model(2, seed=1), tiny_model(4, seed=2)
    assert evaluate_lm(teacher, ids, teacher=teacher).top1_agreement == 1.0
    with torch.no_grad():
        direct = (student(ids[:-1][None]).argmax(-1) == teacher(ids[:-1][None]).argmax(-1)).double().mean().item()
    res = evaluate_lm(student, ids, teacher=teacher, seq_len=59)
    assert res.top1_agreement == pytest.approx(direct) and 0 < res.top1_agreement < 1
    assert evaluate_lm(student, ids).top1_agreement is None


def test_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [5])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model, [1, VOCAB + 3, 2])
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, [1, 2, 3], seq_len=0)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 3, dtype=torch.long))
    other = GQAForCausalLM(GQAConfig(vocab_size=VOCAB + 1, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64))
    with pytest.raises(ValueError, match="teacher vocabulary"):
        evaluate_lm(model, [1, 2, 3], teacher=other)
