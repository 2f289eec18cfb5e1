"""Generation benchmark: decode tokens/s and KV memory vs batch size for the MHA, GQA and MQA variants
of one model, against transformers' ``generate`` on the same weights, plus how many sequences each
variant serves at once in a fixed KV budget (continuous batching over the paged cache).

Timing: the wall time from the first new token to the last of a generate call of N new tokens covers
N - 1 decode steps (gqa: its streaming callback; transformers: a logits processor that only records
the time); decode tokens/s = batch x (N - 1) / that time, best of ``repeats``, gqa and transformers
interleaved run by run. The load average of the machine is recorded with the results. Memory: the bytes of the KV cache each implementation holds at the end of the run
(gqa's static cache, transformers' DynamicCache), read from the cache tensors; on CUDA also the peak
allocated memory of the whole generate call.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from gqa.errors import GQAUserError
from gqa.generation import ContinuousBatcher, generate
from gqa.model import GQAConfig, GQAForCausalLM

__all__ = ["kv_variant", "load_bench_model", "run_generate_bench", "write_generate_results"]

DEFAULT_BATCHES = (1, 2, 4, 8, 16)


def kv_variant(model: GQAForCausalLM, n_kv_heads: int) -> GQAForCausalLM:
    """A copy of ``model`` with ``n_kv_heads`` KV heads in every layer, K/V projections mean-pooled.

    New KV head j is the mean of the old heads it replaces (contiguous groups), so query head h
    still reads the KV head ``h // g`` its old KV head was pooled into. Without uptraining this is the
    GQA paper's starting point: same speed as a trained model of the shape, lower quality.
    """
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
                state[key] = heads.mean(dim=1).reshape(n_kv_heads * d, *t.shape[1:])
    new.load_state_dict(state)
    return new


def load_bench_model(path: str | Path | None = None) -> tuple[GQAForCausalLM, str]:
    """The model to benchmark and a description: ``path``, else the shipped Shakespeare MHA model,
    else random weights of the shipped model's shape."""
    from gqa.evaluate import load_model

    if path is not None:
        model = load_model(path)
        if not isinstance(model, GQAForCausalLM):
            raise GQAUserError(f"{path} is not a llama/mistral/qwen2/qwen3 model gqa can run")
        return model, str(path)
    from gqa.train.pretrain import REFERENCE_CONFIG, shipped_model_path

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

    save_hf(model, folder, overwrite=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


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
    """Decode tokens/s per implementation: best of ``repeats`` runs, the implementations interleaved run
    by run so that both see the same load on a shared machine."""
    for time_fn in timers.values():
        time_fn(2)  # warm-up
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, time_fn in timers.items():
            best[name] = min(best[name], time_fn(new_tokens))
    return {name: batch * (new_tokens - 1) / max(t, 1e-9) for name, t in best.items()}


def _peak_cuda(fn):
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


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
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (see :func:`write_generate_results`).

    budget_sequences: the KV budget is what MHA needs for this many sequences of
    ``prompt_len + new_tokens`` tokens; each variant then serves ``budget_requests`` requests through
    :class:`gqa.generation.ContinuousBatcher` in that budget, recording the most sequences in flight.
    """
    from tqdm.auto import tqdm

    if threads is not None:
        torch.set_num_threads(threads)
    for name, val in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        if not isinstance(val, int) or val < 1:
            raise GQAUserError(f"{name} must be a positive integer, got {val!r}")
    if new_tokens < 2:
        raise GQAUserError("new_tokens must be >= 2 so there is a decode step to time")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise GQAUserError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    load_before = list(os.getloadavg())
    base, description = load_bench_model(model_path)
    cfg: GQAConfig = base.config
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise GQAUserError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context {cfg.max_seq_len}"
        )
    hq = cfg.n_heads
    if hq % group_size:
        raise GQAUserError(f"group size {group_size} does not divide the model's {hq} query heads")
    variants = {"MHA": hq, f"GQA (g={group_size})": hq // group_size, "MQA": 1}
    source_kv = max(cfg.kv_heads_per_layer)
    dtype = next(base.parameters()).dtype
    models = {}
    for name, hkv in variants.items():
        if hkv > min(cfg.kv_heads_per_layer) and hkv != source_kv:
            raise GQAUserError(f"the model has {source_kv} KV heads; the {name} variant needs a model with more")
        models[name] = base if cfg.kv_heads_per_layer == [hkv] * cfg.n_layers else kv_variant(base, hkv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    total = len(models) * len(batch_sizes)
    bar = tqdm(total=total, desc="bench generate", unit="run", disable=not progress)
    tmp = Path(tempfile.mkdtemp(prefix="gqa-bench-generate-"))
    try:
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
                bar.set_postfix_str(f"{name} b={b} gqa {tps['gqa']:.0f} tok/s")
    finally:
        bar.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    # Serving in a fixed KV budget: what MHA needs for `budget_sequences` sequences.
    budget_rows = []
    seq_tokens = prompt_len + new_tokens - 1
    mha_page_bytes = (
        2 * cfg.n_layers * hq * page_size * cfg.resolved_head_dim * torch.empty((), dtype=dtype).element_size()
    )
    budget = budget_sequences * -(-seq_tokens // page_size) * mha_page_bytes
    for name, model in tqdm(models.items(), desc="fixed budget", disable=not progress):
        page_bytes = (
            2
            * sum(model.config.kv_heads_per_layer)
            * page_size
            * cfg.resolved_head_dim
            * torch.empty((), dtype=dtype).element_size()
        )
        batcher = ContinuousBatcher(model, num_pages=budget // page_bytes, page_size=page_size, eos_token_id=None)
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
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "decode": rows,
        "fixed_budget": budget_rows,
        "budget_requests": budget_requests,
        "page_size": page_size,
    }


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gqa.provenance import provenance, provenance_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {**res, "provenance": provenance(command, res.get("dtype")), "speedup_vs_transformers": _speedups(res)}
    paths = []

    def atomic_write(path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        os.replace(tmp, path)
        paths.append(path)

    atomic_write(out_dir / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=2) + "\n"))

    variants = list(dict.fromkeys(r["variant"] for r in res["decode"]))
    colors = dict(zip(variants, ["tab:red", "tab:blue", "tab:green", "tab:purple"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
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
    atomic_write(out_dir / f"{name}.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)

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
    atomic_write(out_dir / f"{name}.md", lambda p: p.write_text("\n".join(lines)))
    return paths


if __name__ == "__main__":  # `python -m gqa.bench.generate`, the same as `gqa bench generate`
    import typer

    from gqa.cli.generate import register_bench

    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register_bench(_app)
    _app()
