"""gqa.generate: greedy parity with transformers' generate, left-padded batches, sampling, streaming,
bad input, and the `gqa generate` command."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import gqa
import helpers
from gqa import GQAForCausalLM
from gqa.cli import app
from gqa.generation import SamplingParams, filter_logits, sample
from gqa.model import from_transformers

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 2], [33, 71, 4, 4, 19]]


def tiny_hf(family: str = "llama", n_kv: int = 2, seed: int = 0, **extra):
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=n_kv,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        **extra,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: peaked, input-dependent logits
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


def tiny_gqa(n_kv=2, seed=0, **kw) -> GQAForCausalLM:
    return helpers.tiny_gqa(n_kv, seed, max_seq_len=64, **kw)  # 64: the CLI's context-limit test relies on it


def hf_greedy(hf, prompts, n):
    """transformers' generate on a left-padded batch: new tokens per prompt."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p)
        att[i, t - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=att, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, t:].tolist()


@pytest.mark.parametrize(
    "family,n_kv,extra",
    [("llama", 2, {}), ("llama", 8, {}), ("llama", 1, {}), ("mistral", 2, {"sliding_window": 5}), ("qwen3", 4, {})],
    ids=["llama-GQA", "llama-MHA", "llama-MQA", "mistral-window", "qwen3"],
)
def test_greedy_matches_transformers_generate(family, n_kv, extra):
    hf = tiny_hf(family, n_kv, **extra)
    ours = from_transformers(hf)
    want_alone = [hf_greedy(hf, [p], 12)[0] for p in PROMPTS]
    got = gqa.generate(ours, PROMPTS, max_new_tokens=12, eos_token_id=None)
    assert got.tokens == want_alone  # a left-padded batch gives each prompt's own tokens
    assert got.tokens == hf_greedy(hf, PROMPTS, 12)  # and transformers' batched generate agrees
    assert len({tuple(t) for t in got.tokens}) == len(PROMPTS)  # the prompts really lead to different text


def test_first_token_of_padded_batch_equals_plain_forward():
    model = tiny_gqa()
    steps = []
    for p in PROMPTS:
        with torch.no_grad():
            steps.append(model(torch.tensor([p]))[0, -1].argmax().item())
    got = gqa.generate(model, PROMPTS, max_new_tokens=1, eos_token_id=None)
    assert [t[0] for t in got.tokens] == steps


def test_padded_batch_on_the_decode_kernel_equals_uncached_and_alone(monkeypatch):
    """Prompts long enough for the CPU decode kernel (>= FUSED_MIN_KEYS keys): a left-padded batch's decode
    steps pass the padding as [B] starts (no [B, Tk] mask rebuilt per step) and give each prompt the tokens
    of an uncached greedy loop (the whole sequence recomputed every step) and of the prompt alone."""
    from gqa.kernels import FUSED_MIN_KEYS, cpu_fused

    model = tiny_gqa(n_kv=2, seed=3)
    model.config.max_seq_len = 400
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, 97, (n,), generator=gen).tolist() for n in (FUSED_MIN_KEYS + 40, FUSED_MIN_KEYS + 3, 300)
    ]
    n_new = 6
    uncached = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n_new):
                ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
            uncached.append(ids[len(p) :])
    starts = []
    real = cpu_fused.fused_decode
    monkeypatch.setattr(cpu_fused, "fused_decode", lambda *a, **kw: starts.append(kw.get("kv_start")) or real(*a, **kw))
    got = gqa.generate(model, prompts, max_new_tokens=n_new, eos_token_id=None)
    assert got.tokens == uncached
    if cpu_fused.available():  # the decode steps ran the kernel with the padding as starts
        pads = [300 - len(p) for p in prompts]  # (B,) left padding: [4, 41, 0]
        assert starts and all(s is not None and s.tolist() == pads for s in starts)
    monkeypatch.setattr(cpu_fused, "fused_decode", real)
    assert [gqa.generate(model, [p], max_new_tokens=n_new, eos_token_id=None).tokens[0] for p in prompts] == uncached
    assert len({tuple(t) for t in got.tokens}) == len(prompts)


def test_per_layer_kv_heads_and_default_model_path():
    model = tiny_gqa(n_kv=[1, 4])
    ids = torch.tensor([PROMPTS[0]])
    want = model.generate_greedy(ids, 10)[0, ids.shape[1] :].tolist()
    assert gqa.generate(model, ids, max_new_tokens=10, eos_token_id=None).tokens == [want]


def test_eos_stops_a_sequence_and_streaming_order():
    model = tiny_gqa()
    free = gqa.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=None).tokens
    eos = free[0][3]  # make the 4th token of prompt 0 the stop token
    seen: list[tuple[int, int]] = []
    res = gqa.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos, on_token=lambda i, t: seen.append((i, t)))
    assert res.tokens[0] == free[0][: free[0].index(eos) + 1]
    for i in range(len(PROMPTS)):  # every streamed token arrives in order and matches the result
        assert [t for j, t in seen if j == i] == res.tokens[i]
    assert res.finished[0]


def test_sampling_is_seeded_and_independent_of_the_batch():
    model = tiny_gqa()
    kw = dict(max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.9, eos_token_id=None)
    a = gqa.generate(model, PROMPTS, seed=7, **kw).tokens
    assert a == gqa.generate(model, PROMPTS, seed=7, **kw).tokens
    assert a != gqa.generate(model, PROMPTS, seed=8, **kw).tokens
    # prompt b samples from generator seed + b, whatever else is in the batch
    assert gqa.generate(model, [PROMPTS[1]], seed=8, **kw).tokens[0] == a[1]


def test_filters_and_degenerate_sampling_equal_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 4.9]])
    assert torch.isinf(filter_logits(logits, top_k=2)).sum(dim=1).tolist() == [2, 2]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))  # row 0: p = .63, .23, ...; row 1: .52, .47
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert (~torch.isinf(filter_logits(logits, top_p=1e-6))).sum(dim=1).tolist() == [1, 1]  # the best survives
    greedy = logits.argmax(-1)
    for params in (SamplingParams(1.0, top_k=1, seed=0), SamplingParams(0.7, top_p=1e-6, seed=0)):
        gens = [params.make_generator(i) for i in range(2)]
        assert torch.equal(sample(logits, params, gens), greedy)
    # a tiny temperature is the argmax (it once made softmax NaN: the maximum divided by 1e-45 was inf)
    for t in (1e-45, 1e-300, 5e-324):
        picked = sample(logits.to(torch.bfloat16), SamplingParams(t, seed=0), None)
        assert torch.equal(picked, greedy), t
    # high temperature visits more than one token
    many = sample(logits[:1].expand(200, -1), SamplingParams(5.0), None)
    assert len(set(many.tolist())) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=60), "context"),
    ],
)
def test_bad_input_is_one_line_error(kwargs, match):
    model = tiny_gqa()
    with pytest.raises(ValueError, match=match) as e:
        gqa.generate(model, PROMPTS, **kwargs)
    assert "\n" not in str(e.value)


def test_empty_and_out_of_vocab_prompts():
    model = tiny_gqa()
    with pytest.raises(ValueError, match="empty"):
        gqa.generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="vocabulary"):
        gqa.generate(model, [[1, 200]])
    with pytest.raises(ValueError, match="tokenizer"):
        gqa.generate(model, "some text")


# --- CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def cli_model(tmp_path, monkeypatch):
    import gqa.model as ev

    model = tiny_gqa()
    monkeypatch.setattr(ev, "load_model", lambda path, **kw: model)
    monkeypatch.setattr(ev, "load_model_tokenizer", lambda path, tok=None: helpers.CharTokenizer())
    return model


def test_cli_generate_streams_and_matches_library(cli_model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(tmp_path), "-p", "Hello", "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    want = gqa.generate(cli_model, [helpers.CharTokenizer().encode("Hello")], max_new_tokens=6).tokens
    assert out["tokens"] == want
    streamed = runner.invoke(app, ["generate", str(tmp_path), "-p", "Hello", "--max-new-tokens", "6"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output.strip() == "Hello" + helpers.CharTokenizer().decode(want[0])
    batch = runner.invoke(app, ["generate", str(tmp_path), "-p", "ab", "-p", "xyz", "--max-new-tokens", "3"])
    assert batch.exit_code == 0, batch.output
    assert "[1] xyz" in batch.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["-p", ""], "empty"),
        (["-p", "x", "--top-p", "2"], "top_p"),
        (["-p", "x", "--temperature", "-0.5"], "temperature"),
        (["-p", "x" * 70], "context"),
    ],
)
def test_cli_generate_bad_input(cli_model, tmp_path, args, match):
    res = CliRunner().invoke(app, ["generate", str(tmp_path), *args])
    assert res.exit_code == 2
    assert match in res.output and res.output.count("\n") == 1


def test_cli_generate_on_the_shipped_model_end_to_end():
    """No stand-ins: the shipped transformers folder and its tokenizer, through the real loaders."""
    from gqa.model import load_model, load_model_tokenizer, shipped_model_path

    path = shipped_model_path()
    res = CliRunner().invoke(
        app, ["generate", str(path), "-p", "ROMEO:", "-p", "To be", "--max-new-tokens", "8", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    tok = load_model_tokenizer(path)
    model = load_model(path)
    ids = [tok.encode("ROMEO:"), tok.encode("To be")]
    want = gqa.generate(model, ids, max_new_tokens=8, tokenizer=tok)
    assert out["tokens"] == want.tokens and out["texts"] == want.texts
    # greedy continuation of each prompt alone equals its row of the padded batch
    assert gqa.generate(model, [ids[1]], max_new_tokens=8).tokens[0] == want.tokens[1]
