"""Dynamic grouping (issue 25): per-prompt clustering of KV heads at prefill, decode over the merged cache.

Checks: kv_fraction=1 is static generation exactly; a sequence's map is the clustering computed directly on
its prompt's K/V; cached = uncached over the merged cache; a batch of prompts with different maps gives each
prompt's tokens alone; the KV slots held match the target; bad options are one-line GQAUserErrors.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gqa
import helpers
from gqa.errors import GQAUserError
from gqa.generation.dynamic import cluster_heads, dynamic_prefill, merge_path, merged_kv, options
from gqa.rope import apply_rope, rope_cos_sin

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 2, 40, 50], [33, 71, 4, 4, 19]]


def _model(n_kv=8, seed=0, **kw):
    return helpers.tiny_gqa(n_kv, seed, max_seq_len=64, **kw)


def _run(model, prompts, n=8, **kw):
    return gqa.generate(model, prompts, max_new_tokens=n, eos_token_id=None, **kw)


def _prompt_qkv(model, prompt, rows):
    """Per layer: queries [Hq, M, D] of the last M positions and keys / values [Hkv, T, D], taken from the
    projections' outputs and a plain static cache (not through the dynamic module)."""
    ids = torch.tensor([prompt])
    t = ids.shape[1]
    outs = []
    handles = [layer.attn.q_proj.register_forward_hook(lambda _m, _a, o: outs.append(o)) for layer in model.layers]
    cache = model.make_cache(1, t)
    with torch.no_grad():
        model(ids, cache=cache)
    for h in handles:
        h.remove()
    per_layer = []
    for li, layer in enumerate(model.layers):
        attn = layer.attn
        q = outs[li].view(1, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (1, Hq, T, D)
        cos, sin = rope_cos_sin(torch.arange(t), attn.inv_freq)
        q = apply_rope(q, cos, sin)[0, :, -min(rows, t) :]  # (Hq, M, D)
        per_layer.append((q, cache[li].k[0, :, :t], cache[li].v[0, :, :t]))
    return per_layer


@pytest.mark.parametrize("n_kv", [8, 4, 2])
def test_full_fraction_is_static_generation(n_kv):
    model = _model(n_kv)
    static = _run(model, PROMPTS)
    for values in ("merge", "keep"):
        res = _run(model, PROMPTS, grouping=options(kv_fraction=1.0, values=values))
        assert res.tokens == static.tokens
        assert all(lg.clusters == tuple((i,) for i in range(n_kv)) for g in res.grouping for lg in g)
    assert static.grouping is None


@pytest.mark.parametrize("n_kv,frac", [(8, 0.5), (8, 0.25), (4, 0.5)])
def test_map_equals_offline_clustering_on_the_prompt(n_kv, frac):
    model = _model(n_kv)
    res = _run(model, PROMPTS, grouping="dynamic", kv_fraction=frac)
    for i, prompt in enumerate(PROMPTS):  # the batch is left-padded; each map is computed on its own tokens
        for li, (q, k, v) in enumerate(_prompt_qkv(model, prompt, rows=64)):
            offline = cluster_heads(q, k, v, n_clusters=int(frac * n_kv))
            got = res.grouping[i][li]
            assert got.clusters == offline.clusters
            assert torch.equal(got.k_index, offline.k_index) and torch.equal(got.v_index, offline.v_index)
            assert got.slots == 2 * int(frac * n_kv)  # KV slots held: the target share of 2 * Hkv


def test_max_error_mode_matches_offline_and_respects_threshold():
    model = _model(8)
    res = _run(model, PROMPTS[:1], grouping="dynamic", max_error=0.05)
    for li, (q, k, v) in enumerate(_prompt_qkv(model, PROMPTS[0], rows=64)):
        offline = cluster_heads(q, k, v, max_error=0.05)
        assert res.grouping[0][li].clusters == offline.clusters
        assert offline.score_error <= 0.05


def test_clustering_merges_duplicate_heads_first_and_is_deterministic():
    torch.manual_seed(1)
    k, v, q = torch.randn(6, 10, 8), torch.randn(6, 10, 8), torch.randn(6, 4, 8)
    k[4], q[4] = k[1], q[1]  # heads 1 and 4 identical in keys and queries: distance 0
    g = cluster_heads(q, k, v, n_clusters=5)
    assert g.clusters == ((0,), (1, 4), (2,), (3,), (5,))
    assert g.score_error == 0.0
    assert cluster_heads(q, k, v, max_error=0.0).clusters == g.clusters
    again = cluster_heads(q, k, v, n_clusters=2)
    assert again.clusters == cluster_heads(q, k, v, n_clusters=2).clusters
    km, vm = merged_kv(g, k, v)  # one mean K and V per cluster, [C, T, D]
    assert (
        km.shape == (5, 10, 8) and torch.allclose(km[1], (k[1] + k[4]) / 2) and torch.allclose(vm[1], (v[1] + v[4]) / 2)
    )
    kept = cluster_heads(q, k, v, n_clusters=5, values="keep")
    assert kept.v_merge.shape == (6, 6) and kept.value_error == 0.0 and torch.equal(kept.v_index, torch.arange(6))


@pytest.mark.parametrize("values,frac", [("merge", 0.5), ("keep", 0.75)])
def test_cached_equals_uncached_over_the_merged_cache(values, frac):
    """Decode logits step by step equal one forward of all the new tokens over the same merged prompt cache."""
    model = _model(8)
    prompts = [PROMPTS[0], [7, 3, 90, 11, 2, 2, 64]]  # equal lengths: no padding
    ids = torch.tensor(prompts)
    opts = options(kv_fraction=frac, values=values)
    with torch.inference_mode():
        cache, logits, groupings, _ = dynamic_prefill(model, ids, torch.zeros(2, dtype=torch.long), 32, opts)
        assert (
            groupings[0][0].clusters != groupings[1][0].clusters or groupings[0][1].clusters != groupings[1][1].clusters
        )
        fresh = copy.deepcopy(cache)
        toks, step_logits = [logits[:, -1].argmax(-1)], []
        for _ in range(6):
            out = model(toks[-1][:, None], cache=cache, logits_to_keep=1)  # (B, 1, vocab)
            step_logits.append(out[:, -1])
            toks.append(out[:, -1].argmax(-1))
        new = torch.stack(toks[:-1], dim=1)  # (B, 6)
        full = model(new, cache=fresh)  # (B, 6, vocab): the new tokens at once, causal over the merged cache
    torch.testing.assert_close(full, torch.stack(step_logits, dim=1), atol=1e-5, rtol=1e-5)
    res = _run(model, prompts, n=7, grouping=opts)  # gqa.generate decodes the same tokens
    assert res.tokens == torch.cat([new, toks[-1][:, None]], dim=1).tolist()


@pytest.mark.parametrize("prompts", [[PROMPTS[0], [7, 3, 90, 11, 2, 2, 64]], PROMPTS])
def test_batch_with_different_maps_equals_each_alone(prompts):
    model = _model(8)
    batch = _run(model, prompts, grouping="dynamic", kv_fraction=0.5)
    assert len({tuple(g[0].clusters) for g in batch.grouping}) > 1  # the maps differ
    for i, p in enumerate(prompts):
        alone = _run(model, [p], grouping="dynamic", kv_fraction=0.5)
        assert batch.tokens[i] == alone.tokens[0]
        assert [lg.clusters for lg in batch.grouping[i]] == [lg.clusters for lg in alone.grouping[0]]


def test_batch_with_different_cluster_counts_under_max_error():
    model = _model(8)
    batch = _run(model, PROMPTS, grouping="dynamic", max_error=0.04)
    counts = {len(g[0].clusters) for g in batch.grouping} | {len(g[1].clusters) for g in batch.grouping}
    assert len(counts) > 1  # sequences hold different numbers of slots in one layer
    for i, p in enumerate(PROMPTS):
        assert batch.tokens[i] == _run(model, [p], grouping="dynamic", max_error=0.04).tokens[0]


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(grouping="clustered"), "grouping must be"),
        (dict(grouping="dynamic"), "exactly one of"),
        (dict(grouping="dynamic", kv_fraction=0.5, max_error=0.1), "exactly one of"),
        (dict(grouping="dynamic", kv_fraction=0.0), "kv_fraction must be"),
        (dict(grouping="dynamic", kv_fraction=1.5), "kv_fraction must be"),
        (dict(grouping="dynamic", kv_fraction="half"), "kv_fraction must be"),
        (dict(grouping="dynamic", kv_fraction=True), "kv_fraction must be"),
        (dict(grouping="dynamic", max_error=-0.1), "max_error must be"),
        (dict(kv_fraction=0.5), 'grouping="dynamic"'),
    ],
)
def test_bad_options_are_one_line_errors(kw, needle):
    with pytest.raises(GQAUserError) as e:
        _run(_model(8), PROMPTS[:1], n=2, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_values_and_sliding_window_models_are_one_line_errors():
    with pytest.raises(GQAUserError, match="above 0.5"):
        options(kv_fraction=0.5, values="keep")
    with pytest.raises(GQAUserError, match="values must be"):
        options(kv_fraction=0.5, values="drop")
    model = _model(8, sliding_window=4, layer_types=["sliding", "global"])
    with pytest.raises(GQAUserError, match="sliding windows") as e:
        _run(model, PROMPTS[:1], n=2, grouping="dynamic", kv_fraction=0.5)
    assert "\n" not in str(e.value)


# --- gqa generate --dynamic-grouping --------------------------------------------------------------------------


@pytest.fixture
def cli_model(monkeypatch):
    import gqa.model as ev

    model = _model(8)
    monkeypatch.setattr(ev, "load_model", lambda path, **kw: model)
    monkeypatch.setattr(ev, "load_model_tokenizer", lambda path, tok=None: helpers.CharTokenizer())
    return model


@pytest.mark.parametrize("flags,kw", [(["--kv-fraction", "0.5"], dict(kv_fraction=0.5)),
                                      (["--max-error", "0.04"], dict(max_error=0.04))])  # fmt: skip
def test_cli_dynamic_grouping_matches_the_library(cli_model, tmp_path, flags, kw):
    import json

    from typer.testing import CliRunner

    from gqa.cli import app

    prompts = ["Hello there", "xyz"]
    args = ["generate", str(tmp_path), "-p", prompts[0], "-p", prompts[1], "--max-new-tokens", "6", "--json"]
    res = CliRunner().invoke(app, [*args, "--dynamic-grouping", *flags])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    ids = [helpers.CharTokenizer().encode(p) for p in prompts]
    want = gqa.generate(cli_model, ids, max_new_tokens=6, grouping="dynamic", **kw)
    assert out["tokens"] == want.tokens
    held = [sum(lg.slots for lg in g) / (2 * 8 * len(cli_model.layers)) for g in want.grouping]
    assert out["kv_fraction_held"] == held
    if "kv_fraction" in kw:
        assert held == [0.5, 0.5]
    static = json.loads(CliRunner().invoke(app, args).output)
    assert "kv_fraction_held" not in static
    assert static["tokens"] == gqa.generate(cli_model, ids, max_new_tokens=6).tokens


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--dynamic-grouping"], "exactly one of --kv-fraction"),
        (["--dynamic-grouping", "--kv-fraction", "0.5", "--max-error", "0.1"], "exactly one of --kv-fraction"),
        (["--dynamic-grouping", "--kv-fraction", "0"], "--kv-fraction must be in (0, 1]"),
        (["--dynamic-grouping", "--kv-fraction", "1.5"], "--kv-fraction must be in (0, 1]"),
        (["--dynamic-grouping", "--kv-fraction", "nan"], "--kv-fraction must be in (0, 1]"),
        (["--dynamic-grouping", "--max-error", "-1"], "--max-error must be >= 0"),
        (["--kv-fraction", "0.5"], "add --dynamic-grouping"),
        (["--max-error", "0.1"], "add --dynamic-grouping"),
    ],
)
def test_cli_dynamic_grouping_bad_input_is_one_line_exit_2(cli_model, tmp_path, flags, needle):
    from typer.testing import CliRunner

    from gqa.cli import app

    res = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", "Hello", "--max-new-tokens", "2", *flags])
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.count("\n") == 1 and res.output.startswith("error: ")


# --- per-sequence head maps in the kernels, and the paged cache --------------------------------------------


def _reference(q, k, v, index, start=None):
    """float64 attention of q [B, Hq, Tq, D] over K/V slots [B, S, Tk, D], query head h of sequence b reading
    slot index[b, h]; bottom-right causal; keys before start[b] hidden."""
    q, k, v = q.double(), k.double(), v.double()
    batch = torch.arange(q.shape[0])[:, None]
    kh, vh = k[batch, index], v[batch, index]  # (B, Hq, Tk, D)
    tq, tk = q.shape[2], k.shape[2]
    s = torch.einsum("bhqd,bhkd->bhqk", q, kh) * q.shape[-1] ** -0.5
    hide = torch.arange(tk)[None, :] > torch.arange(tk - tq, tk)[:, None]  # (Tq, Tk) causal, bottom-right
    hide = hide[None].expand(q.shape[0], -1, -1).clone()
    if start is not None:
        hide |= torch.arange(tk)[None, None, :] < start[:, None, None]
    s = s.masked_fill(hide[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), vh)


INDEX = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 2], [2, 1, 0, 1, 2, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1, 0]])  # slot 2 unread


@pytest.mark.parametrize("tq", [1, 4])
def test_stacked_query_heads_equal_the_gathered_reference(tq):
    from gqa import masks
    from gqa.cache.dynamic import HeadMap, MappedKV
    from gqa.layer import attend

    torch.manual_seed(0)
    b, s, tk, d = 3, 3, 13, 16
    q, k, v = torch.randn(b, 8, tq, d), torch.randn(b, s, tk, d), torch.randn(b, s, tk, d)
    hm = HeadMap.from_index(INDEX, s)
    assert hm.group == 7 and hm.rows.shape == (3, 21)
    assert torch.equal(hm.rows.gather(1, hm.inverse), torch.arange(8).expand(3, 8))  # each head has its own row
    assert torch.equal(hm.inverse // hm.group, INDEX)  # head h's row lies in the group of the slot it reads
    want = _reference(q, k, v, INDEX)
    got = attend(q, MappedKV((k, v), hm), masks.causal())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    start = torch.tensor([0, 3, 5])  # left padding of a ragged batch
    got = attend(q, MappedKV((k, v), hm), masks.causal() & masks.key_padding(start=start))
    torch.testing.assert_close(got.double(), _reference(q, k, v, INDEX, start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq", [1, 4])
def test_stacked_query_heads_over_pages_equal_the_gathered_reference(tq):
    from gqa import masks
    from gqa.cache import PagedKV
    from gqa.cache.dynamic import HeadMap, MappedKV
    from gqa.layer import attend

    torch.manual_seed(1)
    s, d, page = 3, 16, 4
    lengths = [13, 6, 9]
    q = torch.randn(3, 8, tq, d)
    k_pages, v_pages = torch.randn(12, s, page, d), torch.randn(12, s, page, d)
    table = torch.tensor([[5, 0, 7, 2], [1, 9, 0, 0], [11, 3, 4, 0]], dtype=torch.int32)
    kv = PagedKV(k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32))
    got = attend(q, MappedKV(kv, HeadMap.from_index(INDEX, s)), masks.causal())
    for i, n in enumerate(lengths):  # each sequence over its own keys, gathered from its pages
        pages = table[i, : -(-n // page)].long()
        k = k_pages[pages].permute(1, 0, 2, 3).reshape(s, -1, d)[None, :, :n]  # (1, S, n, D)
        v = v_pages[pages].permute(1, 0, 2, 3).reshape(s, -1, d)[None, :, :n]
        want = _reference(q[i : i + 1], k, v, INDEX[i : i + 1])
        torch.testing.assert_close(got[i : i + 1].double(), want, atol=1e-5, rtol=1e-5)


def _batcher(model, **kw):
    from gqa.generation import ContinuousBatcher

    kw.setdefault("grouping", "dynamic")
    kw.setdefault("kv_fraction", 0.5)
    return ContinuousBatcher(model, num_pages=kw.pop("num_pages", 24), page_size=4, eos_token_id=None, **kw)


@pytest.mark.parametrize("n_kv", [8, 4])
def test_paged_map_equals_offline_clustering_and_the_pool_is_smaller(n_kv):
    model = _model(n_kv)
    batcher = _batcher(model)
    ids = [batcher.submit(p, 4) for p in PROMPTS]
    batcher.run()
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        got = batcher.done[rid].grouping
        for li, (q, k, v) in enumerate(_prompt_qkv(model, prompt, rows=64)):
            offline = cluster_heads(q, k, v, n_clusters=n_kv // 2)
            assert got[li].clusters == offline.clusters and torch.equal(got[li].k_index, offline.k_index)
    static = _batcher(model, grouping="static", kv_fraction=None)
    assert batcher.cache.nbytes * 2 == static.cache.nbytes  # pages hold half the slots


@pytest.mark.parametrize("n_kv", [8, 4])
def test_paged_cached_equals_uncached_and_the_static_dynamic_cache(n_kv):
    """Paged decode token by token gives the logits of one forward of the same tokens over the static
    dynamic cache of the same prompt, and the scheduler gives gqa.generate's dynamic tokens."""
    from gqa.generation.dynamic import paged_dynamic_cache, paged_dynamic_prefill

    model = _model(n_kv)
    opts = options(kv_fraction=0.5)
    prompt = PROMPTS[0]
    with torch.inference_mode():
        paged = paged_dynamic_cache(model, opts, num_pages=8, page_size=4)
        logits, grouping, _ = paged_dynamic_prefill(model, paged, "s", prompt, opts)
        toks, step_logits = [logits[:, -1].argmax(-1)], []
        for _ in range(6):
            paged.reserve("s", 1)
            out = model(toks[-1][:, None], cache=paged.batch(["s"]), logits_to_keep=1)  # (1, 1, vocab)
            step_logits.append(out[:, -1])
            toks.append(out[:, -1].argmax(-1))
        static, first, static_grouping, _ = dynamic_prefill(
            model, torch.tensor([prompt]), torch.zeros(1, dtype=torch.long), 32, opts
        )
        assert [g.clusters for g in grouping] == [g.clusters for g in static_grouping[0]]
        torch.testing.assert_close(logits, first, atol=1e-6, rtol=1e-6)
        new = torch.stack(toks[:-1], dim=1)  # (1, 6)
        full = model(new, cache=static)  # (1, 6, vocab) at once over the static merged cache
    torch.testing.assert_close(full, torch.stack(step_logits, dim=1), atol=1e-5, rtol=1e-5)
    for p in PROMPTS:
        batcher = _batcher(model)
        batcher.submit(p, 7)
        assert batcher.run()[0] == _run(model, [p], n=7, grouping="dynamic", kv_fraction=0.5).tokens[0]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_paged_batch_of_different_maps_equals_each_alone(sampled):
    torch.manual_seed(3)
    requests = [(7, 9, 0), (4, 5, 0), (11, 8, 1), (2, 10, 2), (6, 4, 3)]  # (prompt length, new tokens, arrival)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n, _, _ in requests]
    kw = dict(temperature=0.9, top_k=30, seed=7) if sampled else {}
    model = _model(8)
    batcher = _batcher(model, num_pages=14, max_batch=3)  # too small for all at once: requests wait and join
    ids = {}
    while len(ids) < len(requests) or batcher.has_work:
        for i, (_, n_new, arrive) in enumerate(requests):
            if arrive == batcher.steps and i not in ids:
                ids[i] = batcher.submit(prompts[i], n_new, **kw)
        batcher.step()
    reqs = {i: batcher.done[r] for i, r in ids.items()}
    assert len({tuple(r.grouping[0].clusters) for r in reqs.values()}) > 1  # the maps differ
    assert batcher.peak_running >= 2
    for i, req in reqs.items():
        alone = _batcher(model)
        alone.submit(prompts[i], requests[i][1], **kw)
        assert req.tokens == alone.run()[0], f"request {i} differs in a batch"


def test_paged_dynamic_refusals_are_one_line():
    from gqa.cache import PagedKVCache
    from gqa.generation import ContinuousBatcher

    model = _model(8)
    cases = [
        (dict(grouping=options(max_error=0.1)), "takes kv_fraction"),
        (dict(grouping=options(kv_fraction=0.75, values="keep")), 'values="merge"'),
        (dict(grouping="dynamic"), "exactly one of"),
        (dict(grouping="static", kv_fraction=0.5), 'grouping="dynamic"'),
        (dict(grouping="dynamic", kv_fraction=0.5, cache=PagedKVCache.for_model(model, 8, 4)), "PagedDynamicKVCache"),
    ]
    for kw, needle in cases:
        with pytest.raises(GQAUserError) as e:
            ContinuousBatcher(model, num_pages=8, page_size=4, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value)


# --- allocation="measured": the model's KV bytes spread over the layers per prompt ---------------------------


def test_merge_path_follows_cluster_heads_and_its_error_is_the_output_error():
    torch.manual_seed(2)
    q, k, v = torch.randn(8, 5, 8), torch.randn(4, 12, 8), torch.randn(4, 12, 8)  # Hq 8, Hkv 4: g = 2
    path = merge_path(q, k, v)
    assert [len(c) for c, _ in path] == [4, 3, 2, 1] and path[0][1] == 0.0
    for clusters, err in path:
        assert clusters == cluster_heads(q, k, v, n_clusters=len(clusters)).clusters
        qd, kd, vd = q.double(), k.double(), v.double()
        km, vm = kd.clone(), vd.clone()
        for c in clusters:
            km[list(c)], vm[list(c)] = kd[list(c)].mean(0), vd[list(c)].mean(0)
        o = _reference(qd[None, :, :, :], kd[None], vd[None], (torch.arange(8) // 2)[None])
        o2 = _reference(qd[None], km[None], vm[None], (torch.arange(8) // 2)[None])
        assert err == pytest.approx(float((o2 - o).norm() / o.norm()), rel=1e-4, abs=1e-6)


def _prompt_residuals(model, prompt):
    """The residual stream entering each decoder layer on the prompt, [T, d_model] per layer (own hooks)."""
    got = []
    hooks = [layer.register_forward_pre_hook(lambda _m, a: got.append(a[0][0])) for layer in model.layers]
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return got


def test_merge_path_residual_error_is_the_error_added_to_the_residual_stream():
    torch.manual_seed(4)
    q, k, v = torch.randn(8, 5, 8), torch.randn(4, 12, 8), torch.randn(4, 12, 8)
    w_o, resid = torch.randn(16, 64), torch.randn(5, 16)  # o_proj [d_model, Hq * D], residual [M, d_model]
    path = merge_path(q, k, v, o_proj=w_o, residual=resid)
    index = (torch.arange(8) // 2)[None]
    o = _reference(q[None], k[None], v[None], index)[0]  # (Hq, M, D) float64
    for clusters, err in path:
        km, vm = k.double().clone(), v.double().clone()
        for c in clusters:
            km[list(c)], vm[list(c)] = k.double()[list(c)].mean(0), v.double()[list(c)].mean(0)
        o2 = _reference(q[None], km[None], vm[None], index)[0]
        delta = (o2 - o).transpose(0, 1).reshape(5, 64) @ w_o.double().T  # (M, d_model)
        assert err == pytest.approx(float(delta.norm() / resid.double().norm()), rel=1e-4, abs=1e-6)
    assert [c for c, _ in path] == [c for c, _ in merge_path(q, k, v)]  # the same clusterings
    with pytest.raises(GQAUserError, match="together"):
        merge_path(q, k, v, o_proj=w_o)


def test_allocate_slots_is_the_brute_force_optimum():
    import itertools

    from gqa.generation.dynamic import allocate_slots

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n_opts = [3, 4, 2]
        costs = [torch.rand(n, generator=gen).tolist() for n in n_opts]
        slots = [sorted(torch.randint(1, 6, (n,), generator=gen).tolist(), reverse=True) for n in n_opts]
        budget = int(torch.randint(3, 15, (1,), generator=gen))
        feasible = [p for p in itertools.product(*[range(n) for n in n_opts])
                    if sum(s[i] for s, i in zip(slots, p, strict=True)) <= budget]  # fmt: skip
        if not feasible:
            with pytest.raises(GQAUserError, match="cannot hold"):
                allocate_slots(costs, slots, budget)
            continue
        best = min(sum(c[i] for c, i in zip(costs, p, strict=True)) for p in feasible)
        got = allocate_slots(costs, slots, budget)
        assert sum(s[i] for s, i in zip(slots, got, strict=True)) <= budget
        assert sum(c[i] for c, i in zip(costs, got, strict=True)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("values,frac", [("merge", 0.5), ("merge", 0.3), ("keep", 0.75)])
def test_measured_allocation_equals_the_offline_optimum_on_the_prompt(values, frac):
    import itertools

    model = _model(8)
    opts = options(kv_fraction=frac, values=values, allocation="measured")
    res = _run(model, PROMPTS, grouping=opts)
    budget = int(frac * 2 * 8 * 2 + 1e-9)
    counts_seen = set()
    for i, prompt in enumerate(PROMPTS):
        residuals = _prompt_residuals(model, prompt)
        paths = [
            merge_path(q, k, v, values=values, o_proj=model.layers[li].attn.o_proj.weight, residual=residuals[li])
            for li, (q, k, v) in enumerate(_prompt_qkv(model, prompt, rows=64))
        ]
        slots = (lambda c: 2 * c) if values == "merge" else (lambda c: c + 8)
        combos = [p for p in itertools.product(range(8), repeat=2) if sum(slots(8 - j) for j in p) <= budget]
        best = min(
            combos, key=lambda p: (sum(paths[li][j][1] for li, j in enumerate(p)), -sum(slots(8 - j) for j in p))
        )
        want = [paths[li][j][0] for li, j in enumerate(best)]
        got = [lg.clusters for lg in res.grouping[i]]
        assert got == want
        assert sum(lg.slots for lg in res.grouping[i]) <= budget
        counts_seen.add(tuple(len(c) for c in got))
        alone = _run(model, [prompt], grouping=opts)  # a batch with different per-layer counts = each alone
        assert alone.tokens[0] == res.tokens[i]
    assert any(len(set(c)) > 1 for c in counts_seen)  # the layers do get different cluster counts


def test_measured_allocation_options_are_checked():
    with pytest.raises(GQAUserError, match="give kv_fraction"):
        options(max_error=0.1, allocation="measured")
    with pytest.raises(GQAUserError, match="allocation must be"):
        options(kv_fraction=0.5, allocation="greedy")
    from gqa.generation import ContinuousBatcher

    with pytest.raises(GQAUserError, match='allocation="uniform"'):
        ContinuousBatcher(_model(8), num_pages=8, grouping=options(kv_fraction=0.5, allocation="measured"))
