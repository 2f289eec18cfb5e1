"""gqa.convert.calibrated: exact alignment, balanced groups vs brute force, permutation to a standard
checkpoint, merges, calibration statistics and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from gqa import GQAConfig, GQAForCausalLM, load_hf, save_hf
from gqa.convert.calibrated import (
    align_groups,
    balanced_groups,
    build_attention,
    calibration_ids,
    collect_statistics,
    grouping_cost,
    reduce_kv_heads,
    split_heads,
)
from gqa.convert.calibrated.assign import _local_search
from gqa.model import from_transformers


def tiny_model(seed=0, n_heads=8, n_kv_heads=4, qkv_bias=False, n_layers=2) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=97,
        d_model=32,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=8,
        ffn_dim=48,
        max_seq_len=64,
        qkv_bias=qkv_bias,
    )
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so heads differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif qkv_bias:
                p.normal_(0, 0.1)
    return model


def stats_for(model, seed=1, n_seq=6, t=16, attention_sequences=2):
    ids = torch.randint(0, model.config.vocab_size, (n_seq, t), generator=torch.Generator().manual_seed(seed))
    return collect_statistics(model, ids, batch_size=3, attention_sequences=attention_sequences, progress=False)


def fp32_error_scale(model, ids) -> float:
    """How far the fp32 model itself is from its fp64 copy: the tolerance unit."""
    ref = _double(model)(ids)
    return (model(ids).double() - ref).abs().max().item()


def _double(model):
    import copy

    m = copy.deepcopy(model).double()
    for layer in m.layers:
        layer.attn.inv_freq = layer.attn.inv_freq.float()
    return m


def aligned_copy(model, stats, groups):
    import copy

    out = copy.deepcopy(model)
    for i, layer in enumerate(model.layers):
        w, _, _ = align_groups(split_heads(layer.attn), groups, stats[i].input_moment)
        out.layers[i].attn = build_attention(layer.attn, w)
    return out


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_alignment_without_merge_leaves_logits_unchanged(qkv_bias):
    model = tiny_model(qkv_bias=qkv_bias)
    stats = stats_for(model)
    aligned = aligned_copy(model, stats, [[0, 1], [2, 3]])
    # The alignment is not the identity: K, V, Q and O weights all change.
    for old, new in zip(model.layers, aligned.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            delta = (getattr(old.attn, name).weight - getattr(new.attn, name).weight).abs().max()
            assert delta > 1e-2, name
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5))
    ref = _double(model)(ids)
    scale = fp32_error_scale(model, ids)
    err = (aligned(ids).double() - ref).abs().max().item()
    assert err <= 8 * scale + 1e-6, (err, scale)


def test_alignment_exact_for_a_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model = from_transformers(hf)
    stats = stats_for(model)
    aligned = aligned_copy(model, stats, [[0, 1, 2, 3]])
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(6))
    ref = hf.double()(input_ids=ids).logits  # fp64 reference; hf is not used in fp32 after this
    scale = (model(ids).double() - ref).abs().max().item()  # fp32 error of the unaligned model
    err = (aligned(ids).double() - ref).abs().max().item()
    assert err <= 8 * scale, (err, scale)


def _all_balanced_partitions(n, size):
    if n == 0:
        yield []
        return

    def rec(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for others in itertools.combinations(rest, size - 1):
            remaining = [x for x in rest if x not in others]
            for tail in rec(remaining):
                yield [[first, *others], *tail]

    yield from rec(list(range(n)))


@pytest.mark.parametrize("n,groups", [(4, 2), (6, 3), (6, 2), (8, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_groups_are_optimal_by_brute_force(n, groups, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g)
    dist = (a + a.T) / 2
    dist.fill_diagonal_(0)
    best = min(grouping_cost(dist, p) for p in _all_balanced_partitions(n, n // groups))
    chosen = balanced_groups(dist, groups)
    assert sorted(h for grp in chosen for h in grp) == list(range(n))
    assert {len(grp) for grp in chosen} == {n // groups}
    assert grouping_cost(dist, chosen) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_local_search_recovers_a_planted_grouping(seed):
    """20 heads (beyond the exact solver) in 5 hidden groups of 4, labels shuffled: near within a group,
    far across. Local search starts from the contiguous grouping, which is far from the planted one."""
    g = torch.Generator().manual_seed(seed)
    n, size = 20, 4
    perm = torch.randperm(n, generator=g).tolist()
    planted = sorted(sorted(perm[i : i + size]) for i in range(0, n, size))
    dist = 1 + 0.1 * torch.rand(n, n, generator=g, dtype=torch.float64)
    for grp in planted:
        for a, b in itertools.product(grp, grp):
            dist[a, b] = 0.1 * torch.rand(1, generator=g, dtype=torch.float64).item()
    dist = ((dist + dist.T) / 2).fill_diagonal_(0)
    assert planted != [list(range(j, j + size)) for j in range(0, n, size)]
    assert _local_search(dist.tolist(), n, size) == planted


def duplicated_heads_model():
    """Hkv = 4 where KV heads 0 and 2 are identical, and 1 and 3: merging pairs {0,2}, {1,3} is lossless."""
    model = tiny_model(seed=4)
    d = model.config.resolved_head_dim
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.attn.k_proj, layer.attn.v_proj):
                w = proj.weight.view(4, d, -1)
                w[2] = w[0]
                w[3] = w[1]
    return model


@pytest.mark.parametrize("merge", ["mean", "weighted", "lsq", "fit"])
def test_similarity_finds_duplicates_and_permutation_keeps_logits(merge, tmp_path):
    model = duplicated_heads_model()
    stats = stats_for(model)
    new, results = reduce_kv_heads(model, 2, stats, grouping="similarity", align=False, merge=merge, progress=False)
    assert all(r.groups == [[0, 2], [1, 3]] for r in results)
    assert new.config.kv_heads_per_layer == [2, 2]
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    scale = fp32_error_scale(model, ids)
    ref = _double(model)(ids)
    assert (new(ids).double() - ref).abs().max().item() <= 8 * scale + 1e-5
    # A standard checkpoint: query head h reads KV head h // g, so it saves and loads as one.
    save_hf(new, tmp_path / "out")
    loaded = load_hf(tmp_path / "out", dtype=torch.float32)
    assert loaded.config.kv_heads_per_layer == [2, 2]
    torch.testing.assert_close(loaded(ids), new(ids), rtol=0, atol=0)


def test_contiguous_mean_without_alignment_matches_the_paper_pooling():
    model = tiny_model()
    new, results = reduce_kv_heads(model, 2, None, grouping="contiguous", align=False, merge="mean", progress=False)
    d = model.config.resolved_head_dim
    old_k = model.layers[0].attn.k_proj.weight.view(4, d, -1)
    expected = torch.stack([old_k[0:2].mean(0), old_k[2:4].mean(0)]).reshape(2 * d, -1)
    torch.testing.assert_close(new.layers[0].attn.k_proj.weight, expected)
    torch.testing.assert_close(new.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight)
    assert results[0].groups == [[0, 1], [2, 3]] and results[0].error is None


def test_aligned_merges_beat_plain_mean_on_calibration_error():
    model = tiny_model(seed=2)
    stats = stats_for(model, attention_sequences=2)
    _, plain = reduce_kv_heads(model, 1, stats, grouping="contiguous", align=False, merge="mean", progress=False)
    _, aligned = reduce_kv_heads(model, 1, stats, grouping="contiguous", align=True, merge="mean", progress=False)
    for p, a in zip(plain, aligned, strict=True):
        assert a.error < p.error


def test_fit_keeps_the_merge_measured_best_in_each_layer():
    model = tiny_model(seed=2)
    stats = stats_for(model, attention_sequences=2)
    each = {
        m: reduce_kv_heads(model, 1, stats, grouping="contiguous", align=True, merge=m, progress=False)[1]
        for m in ("mean", "weighted", "lsq")
    }
    _, fit = reduce_kv_heads(model, 1, stats, grouping="contiguous", align=True, merge="fit", progress=False)
    for i, f in enumerate(fit):
        errors = {m: each[m][i].error for m in each}
        best = min(errors, key=errors.get)
        assert f.merge == best and f.error == pytest.approx(errors[best], rel=1e-9), (f.merge, errors)


def test_statistics_input_moment_matches_a_direct_computation():
    model = tiny_model()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(8))
    stats = collect_statistics(model, ids, batch_size=2, progress=False)
    x = model.layers[0].attn_norm(model.embed(ids)).double().reshape(-1, 32)
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(stats[0].input_moment, xa.T @ xa / xa.shape[0])
    # the samples are the first batch's attention inputs, captured by a hook on the model's own forward
    torch.testing.assert_close(stats[0].samples.double(), x.view(4, 12, 32)[:2], rtol=0, atol=1e-6)
    assert stats[0].offset_weights is None


def test_offset_distribution_matches_uniform_attention_analytically():
    """With q_proj zeroed every score is 0, so a query at p spreads its mass evenly over keys 0..p: the
    mass at offset k is (1/T) sum_{p >= k} 1/(p+1), for every head, from the model's own projections."""
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.zero_()
    stats = stats_for(model, attention_sequences=3)
    off = stats[0].offset_weights  # (Hq, T)
    t = off.shape[1]
    want = torch.tensor([sum(1 / (p + 1) for p in range(k, t)) / t for k in range(t)], dtype=torch.float64)
    torch.testing.assert_close(off, want.expand_as(off), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(stats[1].offset_weights, want.expand_as(off), atol=1e-3)  # layer 1 attends


def test_calibration_too_short_is_a_one_line_error():
    with pytest.raises(ValueError, match="fewer than --calib-tokens"):
        calibration_ids(list(range(100)), None, 512, 64)
    with pytest.raises(ValueError, match="below one sequence"):
        calibration_ids(list(range(100)), None, 32, 64)
    ids = calibration_ids(list(range(300)), None, 256, 64)
    assert ids.shape == (4, 64)


def test_calibration_text_is_the_prefix_of_the_whole_encoding():
    """Only a prefix of a long text is encoded: the ids must equal the first tokens of encoding it all,
    including a text that is denser in tokens than the prefix guess (it grows) and one just long enough."""
    from gqa.data import encode, load_tokenizer
    from gqa.model.assets import shipped_model_path

    tok = load_tokenizer(shipped_model_path())
    prose = " ".join(f"word{i % 97} and, {i}; the thing." for i in range(20_000))
    dense = "".join(chr(0x4E00 + i % 500) for i in range(40_000))  # several tokens per character
    for text in (prose, dense):
        full = encode(tok, text)
        for n in (256, 4096, (full.numel() // 64) * 64):
            ids = calibration_ids(text, tok, n, 64)
            assert torch.equal(ids.flatten(), full[: ids.numel()]), n


def test_calibration_prefix_grows_for_text_with_many_characters_per_token(monkeypatch):
    """A tokenizer whose tokens are ~21 characters long defeats the first prefix guess (8 characters
    per token): the prefix doubles until it holds enough tokens, and the ids are still the prefix of
    encoding the whole text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    import gqa.data

    words = [f"{i:03d}" + "x" * 17 for i in range(50)]  # 20 characters each, one token each
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    text = " ".join(words[i % 50] for i in range(3000))
    full = gqa.data.encode(tok, text)
    lengths = []
    real_encode = gqa.data.encode
    monkeypatch.setattr(gqa.data, "encode", lambda t, s: lengths.append(len(s)) or real_encode(t, s))
    ids = calibration_ids(text, tok, 1024, 64)
    assert len(lengths) >= 2 and lengths == sorted(lengths)  # grew at least once
    assert torch.equal(ids.flatten(), full[:1024])


def test_bad_requests_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="need calibration"):
        reduce_kv_heads(model, 2, None, grouping="similarity", progress=False)
    with pytest.raises(ValueError, match="neither a divisor"):
        reduce_kv_heads(model, 3, stats_for(model), progress=False)
    with pytest.raises(ValueError, match="unknown merge"):
        reduce_kv_heads(model, 2, stats_for(model), merge="median", progress=False)
    with pytest.raises(ValueError, match="lists 3 layers"):
        reduce_kv_heads(model, [2, 2, 2], stats_for(model), progress=False)


def test_error_curves_kl_and_layer_measures():
    from gqa.convert.calibrated import error_curves

    model = tiny_model(seed=3)
    stats = stats_for(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(9))
    for kw in ({}, {"calib_ids": ids}):
        curves = error_curves(model, stats, merge="mean", progress=False, **kw)
        assert len(curves) == 2
        for c in curves:
            assert sorted(c) == [1, 2, 4] and c[4] == 0.0
            assert c[1] > 0 and c[2] > 0
    # The model is restored after measuring: logits equal the untouched model's.
    fresh = tiny_model(seed=3)
    torch.testing.assert_close(model(ids), fresh(ids), rtol=0, atol=0)


def test_distilled_error_curves_measure_layers_after_distillation():
    """Each curve point is the KL with that one layer reduced *and* distilled: below the merged-only KL
    (distillation recovers), 0 for the layer's own count, and the model is left as it was."""
    from gqa.convert.calibrated import distilled_error_curves, error_curves

    model = tiny_model(seed=3)
    stats = stats_for(model)
    ids = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(9))
    merged = error_curves(model, stats, merge="mean", calib_ids=ids[:4], progress=False)
    settings = {"steps": 20, "lr": 1e-2, "seed": 0}
    distilled = distilled_error_curves(model, stats, ids, merge="mean", distill_settings=settings, progress=False)
    assert [sorted(c) for c in distilled] == [[1, 2, 4]] * 2
    assert all(c[4] == 0.0 and c[1] > 0 and c[2] > 0 for c in distilled)
    assert sum(c[1] + c[2] for c in distilled) < 0.9 * sum(c[1] + c[2] for c in merged)
    fresh = tiny_model(seed=3)
    torch.testing.assert_close(model(ids), fresh(ids), rtol=0, atol=0)
    again = distilled_error_curves(model, stats, ids, merge="mean", distill_settings=settings, progress=False)
    assert again == distilled  # seeded: the same curves


def test_expansion_in_the_calibrated_path_replicates_heads_exactly():
    """Per-layer targets above a layer's KV heads replicate them (new head j = old head j // r), with or
    without statistics; the function is unchanged (float64: only summation order differs)."""
    model = tiny_model()  # 8 query heads, 4 KV heads
    stats = stats_for(model)
    new, results = reduce_kv_heads(model, [8, 2], stats, grouping="similarity", merge="fit", progress=False)
    assert results[0].merge == "replicate" and results[0].error == 0.0
    assert results[0].groups == [[0], [0], [1], [1], [2], [2], [3], [3]]
    d = model.config.resolved_head_dim
    k_old, k_new = model.layers[0].attn.k_proj.weight.view(4, d, -1), new.layers[0].attn.k_proj.weight.view(8, d, -1)
    assert all(torch.equal(k_new[j], k_old[j // 2]) for j in range(8))
    only_expanded, _ = reduce_kv_heads(model, [8, 4], None, grouping="contiguous", align=False, progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(_double(only_expanded)(ids), _double(model)(ids), rtol=0, atol=1e-12)
