"""Generation benchmark: decode tokens/s and KV memory vs batch size for the MHA, GQA and MQA variants
of one model, against transformers' ``generate`` on the same weights, plus how many sequences each
variant serves at once in a fixed KV budget (continuous batching over the paged cache).

Timing: the wall time from the first new token to the last of a generate call of N new tokens covers
N - 1 decode steps (gqa: its streaming callback; transformers: a logits processor that only records
the time); decode tokens/s = batch x (N - 1) / that time, best of ``repeats``, gqa and transformers
interleaved run by run. gqa's timing runs :func:`gqa.generate`, the code path of ``gqa generate``.
The load average of the machine is recorded with the results. Memory: the bytes of the KV cache each
implementation holds at the end of the run (gqa's static cache, transformers' DynamicCache), read from
the cache tensors; on CUDA also the peak allocated memory of the whole generate call.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from gqa.errors import GQAUserError
from gqa.generation import ContinuousBatcher, generate
from gqa.model import GQAConfig, GQAForCausalLM
from gqa.units import check_threads

__all__ = [
    "kv_variant",
    "load_bench_model",
    "run_generate_bench",
    "write_generate_results",
    "check_results_free",
    "estimate_seconds",
    "summary_rows",
    "decode_tokens_per_s",
    "RESULT_SUFFIXES",
]

#: The files a run writes: ``<name>.json``, ``<name>.md``, ``<name>.png``.
RESULT_SUFFIXES = (".json", ".md", ".png")

DEFAULT_BATCHES = (1, 2, 4, 8, 16)


def kv_variant(model: GQAForCausalLM, n_kv_heads: int) -> GQAForCausalLM:
    """A copy of ``model`` with ``n_kv_heads`` KV heads in every layer, K/V projections mean-pooled.

    New KV head j is the mean of the old heads it replaces (contiguous groups), so query head h
    still reads the KV head ``h // g`` its old KV head was pooled into. Without uptraining this is the
    GQA paper's starting point: same speed as a trained model of the shape, lower quality.
    """
    from gqa.convert.merge import mean_pool  # the one mean-pool (gqa convert --merge mean)

    cfg = model.config
    new = GQAForCausalLM(replace(cfg, n_kv_heads=n_kv_heads)).to(next(model.parameters()).dtype).eval()
    state = model.state_dict()
    d = cfg.resolved_head_dim
    for i, old_kv in enumerate(cfg.kv_heads_per_layer):
        if old_kv % n_kv_heads:
            raise GQAUserError(f"layer {i} has {old_kv} KV heads, not a multiple of {n_kv_heads}; pick a divisor")
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"layers.{i}.attn.{proj}.{kind}"
                if key not in state:
                    continue
                t = state[key]
                heads = t.view(n_kv_heads, old_kv // n_kv_heads, d, *t.shape[1:])  # (Hkv_new, group, D, ...)
                pooled = torch.stack([mean_pool(group) for group in heads]).to(t.dtype)  # (Hkv_new, D, ...)
                state[key] = pooled.reshape(n_kv_heads * d, *t.shape[1:])
    new.load_state_dict(state)
    return new


def load_bench_model(path: str | Path | None = None) -> tuple[GQAForCausalLM, str]:
    """The model to benchmark and a description: ``path``, else the shipped Shakespeare MHA model,
    else random weights of the shipped model's shape."""
    from gqa.model import load_model, shipped_model_path

    if path is not None:
        model = load_model(path)
        if not isinstance(model, GQAForCausalLM):
            raise GQAUserError(f"{path} is not a llama/mistral/qwen2/qwen3 model gqa can run")
        return model, str(path)
    from gqa.train.pretrain import REFERENCE_CONFIG

    try:
        shipped = shipped_model_path()
        return load_model(shipped), f"shipped model {shipped.name}"
    except FileNotFoundError:
        torch.manual_seed(0)
        return GQAForCausalLM(REFERENCE_CONFIG).eval(), "random weights of the shipped model's shape (not yet built)"


def _hf_cache_bytes(cache) -> int | None:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(
            t.nbytes
            for layer in layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if t is not None
        )
    return None


def _to_transformers(model: GQAForCausalLM, folder: Path):
    import transformers

    from gqa.model import save_hf
    from gqa.progress import quiet_loading

    save_hf(model, folder, force=True)
    with quiet_loading():
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=False, local_files_only=True
        ).eval()


def _decode_seconds_gqa(model, ids, n: int) -> float:
    """Wall time from the first new token (end of prefill) to the last: n - 1 decode steps."""
    stamps: list[float] = []
    generate(
        model, ids, max_new_tokens=n, eos_token_id=None, on_token=lambda i, tok: i or stamps.append(time.perf_counter())
    )
    return stamps[-1] - stamps[0]


class _StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _decode_seconds_hf(hf, ids, n: int) -> float:
    """The same span for transformers' generate: first step's logits to the last step's."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    _run_hf(hf, ids, n, logits_processor=LogitsProcessorList([clock]))
    return clock.stamps[-1] - clock.stamps[0]


def _run_hf(hf, ids, n, **kw):
    return hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        **kw,
    )


def _measure_pair(timers: dict, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s per timer (implementation or model): best of ``repeats`` runs, the timers
    interleaved run by run so that all see the same load on a shared machine."""
    for time_fn in timers.values():
        time_fn(2)  # warm-up
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, time_fn in timers.items():
            best[name] = min(best[name], time_fn(new_tokens))
    return {name: batch * (new_tokens - 1) / max(t, 1e-9) for name, t in best.items()}


@torch.inference_mode()
def decode_tokens_per_s(
    models: dict[str, GQAForCausalLM],
    *,
    batch: int = 1,
    prompt_len: int = 224,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Decode tokens/s of each model, measured as ``gqa bench generate`` measures it: :func:`gqa.generate`
    (the code path of ``gqa generate``) on a random ``[batch, prompt_len]`` prompt, the time from the first
    new token to the last, best of ``repeats`` after a warm-up, the models interleaved run by run so that
    all see the same machine load. ``prompt_len`` is capped so prompt + new tokens fit each model's context."""
    timers = {}
    for name, model in models.items():
        n = max(1, min(prompt_len, model.config.max_seq_len - new_tokens))
        ids = torch.randint(1, model.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))
        timers[name] = partial(_decode_seconds_gqa, model, ids)
    return _measure_pair(timers, batch, new_tokens, repeats)


def _peak_cuda(fn):
    if not torch.cuda.is_available():
        return None  # nothing to measure: do not spend a generate call on it
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _generate_seconds(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None)
    return time.perf_counter() - t0


def estimate_seconds(
    model: GQAForCausalLM,
    *,
    batch_sizes: tuple[int, ...],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    n_variants: int,
    with_transformers: bool,
    budget_concurrency: list[int],
    budget_requests: int,
) -> float:
    """A rough run time of :func:`run_generate_bench` (seconds), from two short timed generate calls per
    extreme batch size on ``model``: prefill and per-step cost, linear in the batch size. Assumes
    transformers takes 1.3x gqa's time (what the recorded results show) and every variant costs what
    ``model`` costs (fewer KV heads are cheaper, so this leans long)."""

    def cost(b: int) -> tuple[float, float]:  # (prefill s, decode step s)
        short, long = _generate_seconds(model, b, prompt_len, 2), _generate_seconds(model, b, prompt_len, 6)
        step = max((long - short) / 4, 1e-5)
        return max(short - step, 0.0), step

    lo, hi = min(batch_sizes), max(batch_sizes)
    (p_lo, s_lo), (p_hi, s_hi) = cost(lo), cost(hi) if hi != lo else cost(lo)

    def per_call(b: int, n: int) -> float:
        f = 0.0 if hi == lo else (b - lo) / (hi - lo)
        return (p_lo + f * (p_hi - p_lo)) + (n - 1) * (s_lo + f * (s_hi - s_lo))

    impls = 1 + (2.3 if with_transformers else 0.0)  # + transformers (1.3x) and its cache-bytes run
    decode = sum(per_call(b, 2) + repeats * per_call(b, new_tokens) for b in batch_sizes) * impls * n_variants
    budget = sum(
        -(-budget_requests // c) * per_call(min(c, hi), new_tokens) + budget_requests * per_call(1, 1)
        for c in budget_concurrency
    )
    return decode + budget


@torch.inference_mode()
def run_generate_bench(
    model_path: str | Path | None = None,
    *,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES,
    prompt_len: int = 32,
    new_tokens: int = 32,
    repeats: int = 3,
    group_size: int = 4,
    with_transformers: bool = True,
    budget_sequences: int = 4,
    budget_requests: int = 48,
    page_size: int = 16,
    threads: int | None = None,
    progress: bool = True,
    on_estimate: Callable[[float], None] | None = None,
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (see :func:`write_generate_results`).

    budget_sequences: the KV budget is what MHA needs for this many sequences of
    ``prompt_len + new_tokens`` tokens; each variant then serves ``budget_requests`` requests through
    :class:`gqa.generation.ContinuousBatcher` in that budget, recording the most sequences in flight.
    threads: torch CPU threads for the run (restored afterwards).
    on_estimate: called once with the estimated run time in seconds (:func:`estimate_seconds`) before
        the timed runs start.
    """
    for name, val in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        if not isinstance(val, int) or val < 1:
            raise GQAUserError(f"{name} must be a positive integer, got {val!r}")
    if new_tokens < 2:
        raise GQAUserError("new_tokens must be >= 2 so there is a decode step to time; raise --new-tokens")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise GQAUserError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    check_threads(threads)
    saved_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run_generate_bench(
            model_path,
            batch_sizes=batch_sizes,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            repeats=repeats,
            group_size=group_size,
            with_transformers=with_transformers,
            budget_sequences=budget_sequences,
            budget_requests=budget_requests,
            page_size=page_size,
            progress=progress,
            on_estimate=on_estimate,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _run_generate_bench(
    model_path,
    *,
    batch_sizes,
    prompt_len,
    new_tokens,
    repeats,
    group_size,
    with_transformers,
    budget_sequences,
    budget_requests,
    page_size,
    progress,
    on_estimate,
) -> dict:
    from gqa.progress import progress as progress_bar
    from gqa.units import element_size, kv_bytes_per_token

    load_before = list(os.getloadavg())
    t_start = time.perf_counter()
    base, description = load_bench_model(model_path)
    cfg: GQAConfig = base.config
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise GQAUserError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context {cfg.max_seq_len}; "
            "lower --prompt-len or --new-tokens"
        )
    hq = cfg.n_heads
    if hq % group_size:
        raise GQAUserError(f"group size {group_size} does not divide the model's {hq} query heads; pick a divisor")
    dtype = next(base.parameters()).dtype
    variants, models = _variants(base, group_size)

    # Serving in a fixed KV budget: what MHA needs for `budget_sequences` sequences.
    seq_tokens = prompt_len + new_tokens - 1
    page_bytes = {name: page_size * m.config.kv_bytes_per_token(dtype) for name, m in models.items()}
    mha_page_bytes = page_size * kv_bytes_per_token([hq] * cfg.n_layers, cfg.resolved_head_dim, dtype)
    budget = budget_sequences * -(-seq_tokens // page_size) * mha_page_bytes
    pages_per_seq = -(-seq_tokens // page_size)
    concurrency = [min(budget_requests, (budget // page_bytes[n]) // pages_per_seq) for n in models]
    estimate = estimate_seconds(
        base,
        batch_sizes=batch_sizes,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        n_variants=len(models),
        with_transformers=with_transformers,
        budget_concurrency=[max(c, 1) for c in concurrency],
        budget_requests=budget_requests,
    )
    if on_estimate is not None:
        on_estimate(estimate)

    gen = torch.Generator().manual_seed(0)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gqa-bench-generate-"))
    try:
        with progress_bar(
            total=len(models) * len(batch_sizes), desc="bench generate", unit="run", enabled=progress
        ) as bar:
            for name, model in models.items():
                hf = _to_transformers(model, tmp / name.split()[0]) if with_transformers else None
                for b in batch_sizes:
                    ids = torch.randint(1, cfg.vocab_size, (b, prompt_len), generator=gen)  # (B, T)
                    timers = {"gqa": partial(_decode_seconds_gqa, model, ids)}
                    if hf is not None:
                        timers["transformers"] = partial(_decode_seconds_hf, hf, ids)
                    tps = _measure_pair(timers, b, new_tokens, repeats)
                    rows.append(
                        {
                            "impl": "gqa",
                            "variant": name,
                            "kv_heads": variants[name],
                            "batch": b,
                            "decode_tokens_per_s": tps["gqa"],
                            "kv_cache_bytes": model.make_cache(b, prompt_len + new_tokens).nbytes,
                            "peak_cuda_bytes": _peak_cuda(partial(_decode_seconds_gqa, model, ids, new_tokens)),
                        }
                    )
                    if hf is not None:
                        rows.append(
                            {
                                "impl": "transformers",
                                "variant": name,
                                "kv_heads": variants[name],
                                "batch": b,
                                "decode_tokens_per_s": tps["transformers"],
                                "kv_cache_bytes": _hf_cache_bytes(_run_hf(hf, ids, new_tokens).past_key_values),
                                "peak_cuda_bytes": _peak_cuda(partial(_run_hf, hf, ids, new_tokens)),
                            }
                        )
                    bar.update()
                    bar.set_postfix(run=f"{name} b={b}", gqa=f"{tps['gqa']:.0f} tok/s")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    budget_rows = []
    with progress_bar(total=len(models), desc="fixed budget", unit="variant", enabled=progress) as bar:
        for name, model in models.items():
            if model.config.latent_rank is not None:  # the paged cache holds K/V heads, not latents (yet)
                bar.update()
                continue
            batcher = ContinuousBatcher(
                model, num_pages=budget // page_bytes[name], page_size=page_size, eos_token_id=None
            )
            for _ in range(budget_requests):
                batcher.submit(torch.randint(1, cfg.vocab_size, (prompt_len,), generator=gen).tolist(), new_tokens)
            t0 = time.perf_counter()
            done = batcher.run()
            elapsed = time.perf_counter() - t0
            budget_rows.append(
                {
                    "variant": name,
                    "kv_heads": variants[name],
                    "budget_bytes": budget,
                    "pages": batcher.cache.num_pages,
                    "max_concurrent_sequences": batcher.peak_running,
                    "tokens_per_s": sum(len(t) for t in done.values()) / elapsed,
                    "steps": batcher.steps,
                }
            )
            bar.update()
    return {
        "model": description,
        "config": {
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": hq,
            "head_dim": cfg.resolved_head_dim,
            "vocab_size": cfg.vocab_size,
        },
        "dtype": str(dtype).replace("torch.", ""),
        "element_size": element_size(dtype),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "estimated_seconds": estimate,
        "elapsed_seconds": time.perf_counter() - t_start,
        "decode": rows,
        "fixed_budget": budget_rows,
        "budget_requests": budget_requests,
        "page_size": page_size,
    }


def _variants(base: GQAForCausalLM, group_size: int) -> tuple[dict[str, int], dict[str, GQAForCausalLM]]:
    """The models to time, by name, and their KV heads: MHA, GQA (g = group_size) and MQA made from ``base``
    (mean-pooled K/V where it has more heads), or a latent ``base`` alone (its rotated key heads)."""
    cfg = base.config
    if cfg.latent_rank is not None:
        name = f"latent (R={cfg.latent_ranks[0]}, r={cfg.latent_rope_dim}: {cfg.kv_values_per_token()[0]} values/token/layer)"
        return {name: cfg.kv_heads_per_layer[0]}, {name: base}
    hq = cfg.n_heads
    variants = {"MHA": hq, f"GQA (g={group_size})": hq // group_size, "MQA": 1}
    source_kv = max(cfg.kv_heads_per_layer)
    models = {}
    for name, hkv in variants.items():
        if hkv > min(cfg.kv_heads_per_layer) and hkv != source_kv:
            raise GQAUserError(f"the model has {source_kv} KV heads; the {name} variant needs a model with more")
        models[name] = base if cfg.kv_heads_per_layer == [hkv] * cfg.n_layers else kv_variant(base, hkv)
    return variants, models


def check_results_free(out_dir: str | Path, name: str, force: bool = False) -> list[Path]:
    """The result paths ``<out_dir>/<name>{.json,.md,.png}``; raises :class:`GQAUserError` if any exists and
    ``force`` is off (recorded results are replaced only on purpose). Call it before a long run."""
    paths = [Path(out_dir) / f"{name}{suffix}" for suffix in RESULT_SUFFIXES]
    taken = [p for p in paths if p.exists()]
    if taken and not force:
        raise GQAUserError(
            f"{taken[0]} exists; choose another --out or --name, or pass --force to replace the recorded results"
        )
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise GQAUserError(f"--out {out_dir} is a file; give a folder")
    return paths


def summary_rows(res: dict) -> list[tuple[str, int, int, float, float | None, float]]:
    """(variant, KV heads, batch, gqa tok/s, transformers tok/s or None, gqa KV MiB) per gqa row."""
    hf = {(r["variant"], r["batch"]): r for r in res["decode"] if r["impl"] == "transformers"}
    out = []
    for r in res["decode"]:
        if r["impl"] != "gqa":
            continue
        h = hf.get((r["variant"], r["batch"]))
        out.append(
            (
                r["variant"],
                r["kv_heads"],
                r["batch"],
                r["decode_tokens_per_s"],
                h["decode_tokens_per_s"] if h else None,
                r["kv_cache_bytes"] / 2**20,
            )
        )
    return out


def _speedups(res: dict) -> list[dict]:
    out = []
    ours = {(r["variant"], r["batch"]): r for r in res["decode"] if r["impl"] == "gqa"}
    for r in res["decode"]:
        if r["impl"] == "transformers":
            o = ours[(r["variant"], r["batch"])]
            out.append(
                {
                    "variant": r["variant"],
                    "batch": r["batch"],
                    "speedup": o["decode_tokens_per_s"] / r["decode_tokens_per_s"],
                }
            )
    return out


def write_generate_results(
    res: dict, out_dir: str | Path, name: str = "generate-cpu", command: str | None = None
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir`` (temp files renamed)."""
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays as it was

    from gqa.atomic import atomic_file, write_json_atomic, write_text_atomic
    from gqa.provenance import provenance, provenance_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {**res, "provenance": provenance(command, res.get("dtype")), "speedup_vs_transformers": _speedups(res)}
    paths = [write_json_atomic(out_dir / f"{name}.json", res)]

    variants = list(dict.fromkeys(r["variant"] for r in res["decode"]))
    colors = dict(zip(variants, ["tab:red", "tab:blue", "tab:green", "tab:purple"], strict=False))
    fig = Figure(figsize=(16, 4.6))
    axes = fig.subplots(1, 3)
    for v in variants:
        for impl, style in (("gqa", "-o"), ("transformers", "--x")):
            pts = [r for r in res["decode"] if r["variant"] == v and r["impl"] == impl]
            if pts:
                axes[0].plot(
                    [p["batch"] for p in pts],
                    [p["decode_tokens_per_s"] for p in pts],
                    style,
                    color=colors[v],
                    label=f"{impl} {v}",
                )
        pts = [r for r in res["decode"] if r["variant"] == v and r["impl"] == "gqa"]
        axes[1].plot(
            [p["batch"] for p in pts], [p["kv_cache_bytes"] / 2**20 for p in pts], "-o", color=colors[v], label=v
        )
    batches = sorted({r["batch"] for r in res["decode"]})
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_title("decode throughput (solid: gqa, dashed: transformers)")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("KV cache MiB")
    axes[1].set_title(f"KV cache at {res['prompt_len'] + res['new_tokens']} tokens per sequence")
    axes[1].legend(fontsize=8)
    fb = res["fixed_budget"]
    bars = axes[2].bar(
        [r["variant"] for r in fb],
        [r["max_concurrent_sequences"] for r in fb],
        color=[colors[r["variant"]] for r in fb],
    )
    axes[2].bar_label(bars)
    budget_mib = fb[0]["budget_bytes"] / 2**20 if fb else 0
    axes[2].set_title(f"sequences in flight in a {budget_mib:.2f} MiB KV budget")
    axes[2].set_ylabel("max concurrent sequences (paged cache)")
    prov = res["provenance"]
    fig.suptitle(f"{res['model']} · {res['dtype']} · {prov['machine']} · torch {prov['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    with atomic_file(out_dir / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    paths.append(out_dir / f"{name}.png")

    lines = [
        f"# Generation benchmark: {res['model']}",
        "",
        provenance_markdown(prov),
        f"- model shape: {res['config']}; prompt {res['prompt_len']} tokens, {res['new_tokens']} new tokens, "
        f"best of {res['repeats']}, torch threads {res['torch_threads']}",
        "",
        "Decode tokens/s = batch x (new_tokens - 1) / (time from the first new token to the last), best of the "
        "repeats, gqa and transformers interleaved run by run. Machine load average (1, 5, 15 min) before: "
        f"{[round(x, 2) for x in res['load_average_before']]}, after: {[round(x, 2) for x in res['load_average_after']]} "
        f"on {os.cpu_count()} logical CPUs (a load near or above that count means other jobs competed).",
        "KV cache bytes: read from the cache tensors each implementation holds after the run.",
        *(
            [f"Run time {res['elapsed_seconds']:.0f} s (estimated beforehand: {res['estimated_seconds']:.0f} s)."]
            if "elapsed_seconds" in res
            else []
        ),
        "",
        "| variant | KV heads | batch | gqa tok/s | transformers tok/s | speedup | gqa KV cache | transformers KV cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    hf = {(r["variant"], r["batch"]): r for r in res["decode"] if r["impl"] == "transformers"}
    for r in (r for r in res["decode"] if r["impl"] == "gqa"):
        h = hf.get((r["variant"], r["batch"]))
        lines.append(
            f"| {r['variant']} | {r['kv_heads']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | "
            + (
                f"{h['decode_tokens_per_s']:.0f} | {r['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}x | "
                if h
                else "- | - | "
            )
            + f"{r['kv_cache_bytes'] / 2**20:.2f} MiB | "
            + (f"{h['kv_cache_bytes'] / 2**20:.2f} MiB |" if h and h["kv_cache_bytes"] is not None else "- |")
        )
    lines += [
        "",
        f"## Serving in a fixed KV budget ({budget_mib:.2f} MiB: MHA's need for {fb[0]['max_concurrent_sequences'] if fb else '?'} sequences)",
        "",
        f"{res['budget_requests']} requests through the continuous-batching scheduler over the paged cache "
        f"(pages of {res['page_size']} tokens).",
        "",
        "| variant | KV heads | pages | max concurrent sequences | vs MHA | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    mha = fb[0]["max_concurrent_sequences"] if fb else 1
    for r in fb:
        lines.append(
            f"| {r['variant']} | {r['kv_heads']} | {r['pages']} | {r['max_concurrent_sequences']} | "
            f"{r['max_concurrent_sequences'] / mha:.1f}x | {r['tokens_per_s']:.0f} |"
        )
    lines += ["", f"![plot]({name}.png)", ""]
    paths.append(write_text_atomic(out_dir / f"{name}.md", "\n".join(lines)))
    return paths
