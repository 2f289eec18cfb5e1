"""``gqa bench attention``: decode attention against SDPA, repeat_kv + SDPA and FlexAttention.

A decode step (Tq = 1) must read ``2 * B * Hkv * S_visible * D * bytes`` of KV cache, so each
implementation is reported as time, achieved GB/s of that KV read, and the fraction of the copy
and read bandwidths measured in the same run. Every timed call starts with cold caches (a buffer
larger than the last-level cache is written between calls, outside the timed region), so a KV
cache that fits in cache is not reported above the memory's speed.

Peers, each on the same q/k/v (query head h uses KV head h // g in all of them):

* ``gqa`` — ``gqa.attention`` with automatic dispatch (the decode kernels where they apply);
* ``sdpa[<backend>]`` — ``scaled_dot_product_attention(..., enable_gqa=True)`` restricted to each
  backend PyTorch offers on the device (a backend that refuses the inputs is recorded, not fatal);
* ``repeat_kv+sdpa`` — K/V repeated to Hq heads, then SDPA: what transformers runs when a mask is passed;
* ``flex`` — ``torch.compile(flex_attention)`` with a block mask; a compile failure is recorded.

Results go to ``benchmarks/results/<machine>-<date>.{json,md,png}`` with provenance.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gqa.atomic import atomic_file, write_json_atomic, write_text_atomic
from gqa.errors import GQAUserError
from gqa.provenance import cpu_name, load_average, provenance_markdown
from gqa.units import check_threads

__all__ = [
    "Case",
    "cases_for",
    "run_attention_bench",
    "write_results",
    "MODES",
    "run_cpu_decode_bench",
    "write_cpu_decode_results",
    "CPU_DECODE_CASES",
]

MODES = ("quick", "default", "full")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One decode step: B sequences of S cached tokens, Hq/Hkv heads of size D, an optional window."""

    name: str
    batch: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    seq: int
    window: int | None = None

    def kv_bytes(self, element_size: int) -> int:
        """Bytes of K and V a decode step must read (only the window when there is one)."""
        visible = min(self.seq, self.window) if self.window else self.seq
        return 2 * self.batch * self.n_kv_heads * visible * self.head_dim * element_size

    def cache_bytes(self, element_size: int) -> int:
        return 2 * self.batch * self.n_kv_heads * self.seq * self.head_dim * element_size


def _case(variant: str, hkv: int, batch: int, seq: int, window: int | None = None) -> Case:
    k = f"{seq // 1024}k"
    name = f"{variant} B={batch} S={k}" + (f" window={window // 1024}k" if window else "")
    return Case(name, batch, 32, hkv, 128, seq, window)


def cases_for(mode: str, device: str) -> list[Case]:
    """The issue's cases (a Llama-3-8B-like layer: 32 q heads, D = 128) for a mode.

    ``full``: GQA (8 kv heads), MQA (1) and MHA (32) at B = 1 with S in {4k, 32k, 128k} and B = 32 with
    S = 4k, and the same with a 4k sliding window where S > 4k. ``default`` on CPU keeps a subset
    that runs in a few minutes on two cores; ``quick`` is a smoke test.
    """
    if mode not in MODES:
        raise GQAUserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    variants = (("GQA", 8), ("MQA", 1), ("MHA", 32))
    if mode == "quick":
        return [_case("GQA", 8, 1, 4096), _case("GQA", 8, 1, 8192, window=4096)]
    if mode == "default" and device == "cpu":
        return [
            _case("GQA", 8, 1, 4096),
            _case("GQA", 8, 1, 32768),
            _case("GQA", 8, 32, 4096),
            _case("MQA", 1, 1, 32768),
            _case("MHA", 32, 1, 4096),
            _case("GQA", 8, 1, 32768, window=4096),
        ]
    out = []
    for variant, hkv in variants:
        for batch, seq in ((1, 4096), (1, 32768), (1, 131072), (32, 4096)):
            out.append(_case(variant, hkv, batch, seq))
        for batch, seq in ((1, 32768), (1, 131072)):
            out.append(_case(variant, hkv, batch, seq, window=4096))
    return out


# ----------------------------------------------------------------------------------------------
# Timing


class _Timer:
    """Cold-cache timing: a buffer larger than the last-level cache is rewritten before each call."""

    def __init__(self, device: torch.device, min_time: float, max_iters: int):
        self.device = device
        self.min_time = min_time
        self.max_iters = max_iters
        flush_bytes = 256 * 2**20 if device.type == "cuda" else 96 * 2**20
        self.flush_buf = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)

    def _flush(self):
        self.flush_buf.add_(1.0)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        """Median seconds of ``fn()`` over up to ``max_iters`` cold calls (at least 2, about ``min_time`` in all)."""
        fn()  # warm-up (compilation, allocator)
        self._sync()
        times: list[float] = []
        spent = 0.0
        while len(times) < 2 or (spent < self.min_time and len(times) < self.max_iters):
            self._flush()
            self._sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
        times.sort()
        return times[len(times) // 2]


def measure_bandwidth(device: torch.device, nbytes: int, timer: _Timer) -> dict:
    """Copy (read + write bytes / time, as STREAM counts it) and read-only (sum) bandwidth in GB/s."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = timer.time(lambda: dst.copy_(src))
    t_read = timer.time(lambda: src.sum())
    return {"bytes": n * 4, "copy_gbps": 2 * n * 4 / t_copy / 1e9, "read_gbps": n * 4 / t_read / 1e9}


# ----------------------------------------------------------------------------------------------
# Peers


def _sdpa_backends(device: torch.device) -> list[str]:
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    else:
        names = ["FLASH_ATTENTION", "MATH"]
    return [n for n in names if hasattr(SDPBackend, n)]


def _peers(case: Case, q, k, v, mask, bool_mask, flex_fn, block_mask) -> dict:
    """name -> zero-argument callable computing the same attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import gqa

    g = case.n_heads // case.n_kv_heads
    peers = {"gqa": lambda: gqa.attention(q, k, v, mask=mask)}
    for name in _sdpa_backends(q.device):

        def run(name=name):
            with sdpa_kernel([getattr(SDPBackend, name)]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=g > 1)

        peers[f"sdpa[{name.lower().replace('_attention', '')}]"] = run

    def repeat_then_sdpa():
        k_rep = k.repeat_interleave(g, dim=1) if g > 1 else k  # (B, Hq, S, D): head h holds KV head h // g
        v_rep = v.repeat_interleave(g, dim=1) if g > 1 else v
        return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=bool_mask)

    peers["repeat_kv+sdpa"] = repeat_then_sdpa
    if flex_fn is not None:
        peers["flex"] = lambda: flex_fn(q, k, v, block_mask=block_mask, enable_gqa=g > 1)
    return peers


def _flex(case: Case, device: torch.device):
    """(compiled flex_attention, block mask) or raises with the reason."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    last = case.seq - 1  # the decode query sits at the last position (bottom-right)
    window = case.window

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + last
        if window:
            visible = visible & (kv_idx > q_idx + last - window)
        return visible

    block_mask = create_block_mask(mask_mod, None, None, 1, case.seq, device=str(device))
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        # One compiled function for all cases: after the second shape, torch.compile's automatic
        # dynamic shapes reuse one graph instead of recompiling per case (tens of seconds on CPU).
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED, block_mask


_FLEX_COMPILED = None


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class Measurement:
    peer: str
    seconds: float | None = None
    gbps: float | None = None
    error: str | None = None
    max_abs_err: float | None = None


@dataclass
class CaseResult:
    case: Case
    kv_bytes: int
    measurements: list[Measurement] = field(default_factory=list)
    skipped: str | None = None
    gqa_backend: str | None = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def run_attention_bench(
    *,
    device: str = "cpu",
    dtype: str = "float32",
    mode: str = "default",
    min_time: float | None = None,
    max_iters: int = 10,
    max_memory_gb: float = 8.0,
    flex: bool = True,
    progress: bool = True,
    command: str | None = None,
    threads: int | None = None,
) -> dict:
    """Run the benchmark; returns the results dict that :func:`write_results` writes.

    ``command`` is recorded as the command that reproduces the run (default: this process's argv).
    """
    import gqa

    if dtype not in _DTYPES:
        raise GQAUserError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise GQAUserError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise GQAUserError("--device cuda needs a CUDA GPU and a CUDA build of torch; this machine has none")
    dev = torch.device(device)
    torch_dtype = _DTYPES[dtype]
    if check_threads(threads) is not None:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_attention_bench(
                device=device,
                dtype=dtype,
                mode=mode,
                min_time=min_time,
                max_iters=max_iters,
                max_memory_gb=max_memory_gb,
                flex=flex,
                progress=progress,
                command=command,
            )
        finally:
            torch.set_num_threads(previous_threads)
    if min_time is None:
        min_time = 0.3 if mode == "quick" else 1.0
    cases = cases_for(mode, device)
    timer = _Timer(dev, min_time, max_iters)
    load_before = load_average()
    bandwidth = measure_bandwidth(dev, 1024 * 2**20 if device == "cuda" else 256 * 2**20, timer)

    from gqa.progress import progress as progress_bar

    results: list[CaseResult] = []
    bar = progress_bar(total=len(cases), desc="bench attention", unit="case", enabled=progress)
    elsize = torch.tensor([], dtype=torch_dtype).element_size()
    for case in cases:
        bar.set_postfix(case=case.name)
        res = CaseResult(case, case.kv_bytes(elsize))
        results.append(res)
        g = case.n_heads // case.n_kv_heads
        need = case.cache_bytes(elsize) * (1 + g)  # the cache, and repeat_kv's copy of it
        if need > max_memory_gb * 2**30:
            res.skipped = f"needs about {need / 2**30:.1f} GiB (> --max-memory-gb {max_memory_gb:g})"
            bar.update(1)
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape_q = (case.batch, case.n_heads, 1, case.head_dim)
        shape_kv = (case.batch, case.n_kv_heads, case.seq, case.head_dim)
        q = torch.randn(shape_q, generator=gen).to(dev, torch_dtype)
        k = torch.randn(shape_kv, generator=gen).to(dev, torch_dtype)
        v = torch.randn(shape_kv, generator=gen).to(dev, torch_dtype)
        mask = gqa.masks.sliding_window(case.window) if case.window else None
        # SDPA's bool mask for the one decode query at position S - 1 (None when nothing is hidden).
        bool_mask = None
        if case.window:
            bool_mask = mask.materialize(1, case.seq, device=dev).view(1, 1, 1, case.seq)
        res.gqa_backend = gqa.select_backend(q, k, v, mask)
        flex_fn = block_mask = flex_error = None
        if flex:
            try:
                flex_fn, block_mask = _flex(case, dev)
            except Exception as e:  # noqa: BLE001 - any failure to build is a result to record
                flex_error = _one_line(e)
        reference = None
        for peer, fn in _peers(case, q, k, v, mask, bool_mask, flex_fn, block_mask).items():
            m = Measurement(peer)
            try:
                out = fn()
                if reference is None:  # the first peer (gqa) is the yardstick for agreement
                    reference = out.float()
                m.max_abs_err = float((out.float() - reference).abs().max())
                m.seconds = timer.time(fn)
                m.gbps = res.kv_bytes / m.seconds / 1e9
            except Exception as e:  # noqa: BLE001 - a backend refusing these inputs is a result
                m.error = _one_line(e)
            res.measurements.append(m)
            del out
        if flex and flex_error:
            res.measurements.append(Measurement("flex", error=flex_error))
        elif not flex:
            res.measurements.append(Measurement("flex", error="not run (--no-flex)"))
        del q, k, v
        bar.update(1)
    bar.close()
    bandwidth_after = measure_bandwidth(dev, bandwidth["bytes"], timer)
    return {
        "provenance": provenance(device, dtype, mode, load_before, command),
        "bandwidth": {"before": bandwidth, "after": bandwidth_after},
        "cases": [_case_dict(r, bandwidth, bandwidth_after) for r in results],
    }


def _case_dict(r: CaseResult, bw_before: dict, bw_after: dict) -> dict:
    copy = (bw_before["copy_gbps"] + bw_after["copy_gbps"]) / 2
    read = (bw_before["read_gbps"] + bw_after["read_gbps"]) / 2
    ours = next((m for m in r.measurements if m.peer == "gqa" and m.seconds), None)
    rows = []
    for m in r.measurements:
        d = asdict(m)
        if m.seconds:
            d["frac_copy_bw"] = m.gbps / copy
            d["frac_read_bw"] = m.gbps / read
            d["gqa_speedup"] = m.seconds / ours.seconds if ours else None  # peer time / gqa time
        rows.append(d)
    return {**asdict(r.case), "kv_bytes": r.kv_bytes, "gqa_backend": r.gqa_backend, "skipped": r.skipped, "peers": rows}


# ----------------------------------------------------------------------------------------------
# Provenance and output


def provenance(device: str, dtype: str, mode: str, load_before, command: str | None = None) -> dict:
    """The project's provenance schema (:func:`gqa.provenance.provenance`) plus this benchmark's keys."""
    from gqa.provenance import provenance as base_provenance

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return base_provenance(
        command,
        dtype,
        load_before=list(load_before) if load_before is not None else None,
        device=device,
        mode=mode,
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=gpu,
    )


def _load_text(p: dict) -> str:
    load = p.get("load_average") or {}
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs) if xs else "not recorded"  # noqa: E731
    return f"{fmt(load.get('before'))} -> {fmt(load.get('after'))} on {load.get('cpus')} CPUs"


def machine_slug(prov: dict) -> str:
    name = prov["gpu"] or f"{prov['cpu']}-{prov['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def to_markdown(results: dict) -> str:
    p = results["provenance"]
    bw = results["bandwidth"]
    lines = [
        f"# Decode attention benchmark — {p['cpu'] if not p['gpu'] else p['gpu']} ({p['device']}, {p['dtype']})",
        "",
        provenance_markdown(p).rstrip(),
        f"- bandwidth measured in this run ({bw['before']['bytes'] / 2**20:.0f} MiB, cold): copy "
        f"{bw['before']['copy_gbps']:.1f} / {bw['after']['copy_gbps']:.1f} GB/s (before / after, read+write), "
        f"read {bw['before']['read_gbps']:.1f} / {bw['after']['read_gbps']:.1f} GB/s",
        "",
        "Each case is one decode step (Tq = 1, the query at the last position). GB/s counts the KV bytes "
        "the step must read (the window only, when there is one); `x gqa` is the peer's time over gqa's "
        "(above 1: gqa is faster). Timings are medians of cold-cache calls.",
        "",
    ]
    for c in results["cases"]:
        lines.append(
            f"## {c['name']} — {c['n_heads']} q / {c['n_kv_heads']} kv heads, D={c['head_dim']}, "
            f"KV read {c['kv_bytes'] / 2**20:.1f} MiB"
        )
        lines.append("")
        if c["skipped"]:
            lines += [f"skipped: {c['skipped']}", ""]
            continue
        lines.append(f"gqa dispatch: `{c['gqa_backend']}`")
        lines.append("")
        lines.append("| implementation | time | GB/s | of copy BW | of read BW | x gqa | note |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for m in c["peers"]:
            if m["seconds"] is None:
                lines.append(f"| {m['peer']} | - | - | - | - | - | {m['error']} |")
                continue
            note = f"max diff to gqa {m['max_abs_err']:.1e}" if m["peer"] != "gqa" else ""
            lines.append(
                f"| {m['peer']} | {_fmt_time(m['seconds'])} | {m['gbps']:.1f} | {m['frac_copy_bw']:.0%} | "
                f"{m['frac_read_bw']:.0%} | {m['gqa_speedup']:.2f} | {note} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Bar chart: achieved GB/s of KV read per case and implementation, copy bandwidth as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays as it was

    cases = [c for c in results["cases"] if not c["skipped"]]
    peers = []
    for c in cases:
        for m in c["peers"]:
            if m["seconds"] and m["peer"] not in peers:
                peers.append(m["peer"])
    fig = Figure(figsize=(max(7, 1.6 * len(cases) + 2.5), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        vals = [next((m["gbps"] for m in c["peers"] if m["peer"] == peer and m["seconds"]), 0.0) for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=peer)
    bw = results["bandwidth"]
    copy = (bw["before"]["copy_gbps"] + bw["after"]["copy_gbps"]) / 2
    read = (bw["before"]["read_gbps"] + bw["after"]["read_gbps"]) / 2
    ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy BW {copy:.0f} GB/s")
    ax.axhline(read, color="grey", ls=":", lw=1, label=f"read BW {read:.0f} GB/s")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], [c["name"] for c in cases], rotation=20, ha="right")
    ax.set_ylabel("GB/s of KV cache read")
    ax.set_yscale("log")
    p = results["provenance"]
    ax.set_title(
        f"Decode attention (Tq = 1), {p['machine']}, {p['dtype']}, {p['torch_threads']} threads, load {_load_text(p)}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _result_stem(
    *, gpu: str | None, cpu: str, cpu_cores: int | None, date: str, dtype: str, device: str, threads: int, mode: str
) -> str:
    stem = f"{machine_slug({'gpu': gpu, 'cpu': cpu, 'cpu_cores': cpu_cores})}-{date[:10]}"
    if dtype != "float32":
        stem += f"-{dtype}"
    if device == "cpu" and threads != os.cpu_count():
        stem += f"-{threads}threads"
    if mode != "default":
        stem += f"-{mode}"
    return stem


def _refuse_taken(paths: dict[str, Path], force: bool) -> None:
    taken = [p for p in paths.values() if p.exists()]
    if taken and not force:
        raise GQAUserError(f"{taken[0]} exists; choose another --out, or pass --force to replace the recorded results")


def check_results_free(
    out_dir: str | Path, *, device: str, dtype: str, mode: str, threads: int | None = None, force: bool = False
) -> dict[str, Path]:
    """The paths :func:`write_results` will write for a run started now with these options; raises
    :class:`GQAUserError` if ``out_dir`` is a file, or if any path exists and ``force`` is off (recorded
    results are replaced only on purpose). Call it before a long run."""
    from gqa.provenance import utc_date

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GQAUserError(f"--out {out_dir} is a file; pass a directory")
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    stem = _result_stem(
        gpu=gpu,
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        date=utc_date(),
        dtype=dtype,
        device=device,
        threads=threads if threads is not None else torch.get_num_threads(),
        mode=mode,
    )
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    _refuse_taken(paths, force)
    return paths


def write_results(results: dict, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write ``<machine>-<date>[-<dtype>][-<n>threads][-<mode>].{json,md,png}`` under ``out_dir`` (temp file,
    then rename). Existing results of the same name are replaced only with ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GQAUserError(f"--out {out_dir} is a file; pass a directory")
    p = results["provenance"]
    stem = _result_stem(
        gpu=p["gpu"],
        cpu=p["cpu"],
        cpu_cores=p["cpu_cores"],
        date=p["date"],
        dtype=p["dtype"],
        device=p["device"],
        threads=p["torch_threads"],
        mode=p["mode"],
    )
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    _refuse_taken(paths, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths["json"], results)
    write_text_atomic(paths["md"], to_markdown(results))
    with atomic_file(paths["png"]) as tmp:  # the temp name keeps the suffix: it picks the image format
        plot(results, tmp)
    return paths


def summary_rows(results: dict) -> list[tuple]:
    """(case, best peer other than gqa, its time / gqa time, gqa GB/s, gqa fraction of copy BW) per case."""
    rows = []
    for c in results["cases"]:
        if c["skipped"]:
            rows.append((c["name"], "skipped", math.nan, math.nan, math.nan))
            continue
        ours = next((m for m in c["peers"] if m["peer"] == "gqa" and m["seconds"]), None)
        others = [m for m in c["peers"] if m["peer"] != "gqa" and m["seconds"]]
        best = min(others, key=lambda m: m["seconds"]) if others else None
        rows.append(
            (
                c["name"],
                best["peer"] if best else "-",
                best["seconds"] / ours["seconds"] if best and ours else math.nan,
                ours["gbps"] if ours else math.nan,
                ours["frac_copy_bw"] if ours else math.nan,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------
# The CPU decode comparison (issue 11): the fused kernel against the machine's read bandwidth and
# the torch alternatives, fp32 and bf16, in one run.

#: (name, batch, cached tokens) at 32 query / 8 KV heads, head_dim 128 (a Llama-3-8B-like layer).
CPU_DECODE_CASES = (("B=1 S=32k", 1, 32768), ("B=4 S=8k", 4, 8192))
#: The issue's goals (measurements, not tests): fused GB/s over read bandwidth, speedups over peers.
CPU_DECODE_GOALS = {"of_read_bw": 0.60, "x_grouped_matmul": 1.3, "x_sdpa_enable_gqa": 2.0}
CPU_DECODE_PEERS = (
    "gqa fused C++",
    "gqa torch split-KV (previous path)",
    "grouped matmul",
    "sdpa enable_gqa",
)


def _cpu_decode_peers(q, k, v) -> dict:
    """name -> zero-argument callable: one decode step (the query at the last position, every key visible)."""
    from gqa.kernels import cpu_fused
    from gqa.kernels.cpu import split_kv_decode_cpu

    b, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    lens = torch.full((b,), s, dtype=torch.int32)
    scale = d**-0.5

    def fused():
        return cpu_fused.fused_decode(q, k, v, lens, lens - 1, scale=scale, causal=True, window=None, chunk=None)

    def previous():
        return split_kv_decode_cpu(q, k, v, lens, lens - 1, scale=scale, causal=True, window=None, chunk=None)

    def grouped_matmul():  # the three lines of torch the issue measures against
        scores = (q.view(b, hkv, g, d) @ k.transpose(-1, -2)) * scale  # (B, Hkv, g, S)
        return (torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v).view(b, hq, 1, d)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    peers = dict(zip(CPU_DECODE_PEERS, (fused, previous, grouped_matmul, sdpa), strict=True))
    if not cpu_fused.available():
        del peers["gqa fused C++"]
    return peers


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_cpu_decode_bench(
    *,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    cases: tuple | None = None,
    rounds: int = 7,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Time one decode step of every peer, fp32 and bf16, at the issue's cases, against a streaming read
    (``sum``) and copy of as many bytes, all in one run.

    The peers run round-robin ``rounds`` times (one call each per round), so a burst of load on a shared
    machine hits them alike; GB/s comes from each peer's best round (best-of), and the medians are kept
    too. The KV cache of each case (>= 128 MiB) is several times the last-level cache, so every call
    reads from memory. Threads: ``threads`` or torch's default, restored afterwards.
    """
    import subprocess

    from gqa.kernels import cpu_fused
    from gqa.progress import progress as progress_bar
    from gqa.provenance import provenance as base_provenance

    for name in dtypes:
        if name not in ("float32", "bfloat16"):
            raise GQAUserError(f"unknown dtype {name!r} for the CPU decode benchmark; choose float32 and/or bfloat16")
    if rounds < 1:
        raise GQAUserError(f"--rounds must be >= 1, got {rounds}")
    check_threads(threads)
    cases = CPU_DECODE_CASES if cases is None else cases
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        fused_status = cpu_fused.status()  # builds the kernel first, outside any timing
        load_before = load_average()
        rows = []
        bar = progress_bar(total=len(dtypes) * len(cases), desc="bench cpu-decode", unit="case", enabled=progress)
        for dtype_name in dtypes:
            dtype = _DTYPES[dtype_name]
            for case_name, batch, seq in cases:
                bar.set_postfix(case=f"{dtype_name} {case_name}")
                gen = torch.Generator().manual_seed(0)
                q = torch.randn(batch, 32, 1, 128, generator=gen).to(dtype)
                k = torch.randn(batch, 8, seq, 128, generator=gen).to(dtype)
                v = torch.randn(batch, 8, seq, 128, generator=gen).to(dtype)
                kv_bytes = 2 * k.numel() * k.element_size()
                src = torch.randn(kv_bytes // 4, generator=gen)  # as many bytes as the KV cache, fp32
                dst = torch.empty_like(src)
                peers = _cpu_decode_peers(q, k, v)
                yardstick = peers["grouped matmul"]().float()
                errors = {name: float((fn().float() - yardstick).abs().max()) for name, fn in peers.items()}
                timed = {"read (sum)": src.sum, "copy": partial(dst.copy_, src), **peers}
                times: dict[str, list[float]] = {name: [] for name in timed}
                for _ in range(rounds):
                    for name, fn in timed.items():
                        times[name].append(_time_once(fn))
                best = {name: min(ts) for name, ts in times.items()}
                read_gbps = kv_bytes / best["read (sum)"] / 1e9
                row = {
                    "dtype": dtype_name,
                    "case": case_name,
                    "batch": batch,
                    "seq": seq,
                    "n_heads": 32,
                    "n_kv_heads": 8,
                    "head_dim": 128,
                    "kv_bytes": kv_bytes,
                    "read_gbps": read_gbps,
                    "copy_gbps": 2 * kv_bytes / best["copy"] / 1e9,
                    "peers": {},
                }
                for name in peers:
                    row["peers"][name] = {
                        "best_s": best[name],
                        "median_s": sorted(times[name])[len(times[name]) // 2],
                        "gbps": kv_bytes / best[name] / 1e9,
                        "of_read_bw": kv_bytes / best[name] / 1e9 / read_gbps,
                        "max_abs_diff_to_grouped_matmul": errors[name],
                    }
                fused = row["peers"].get("gqa fused C++")
                if fused:
                    ratios = {
                        "of_read_bw": fused["of_read_bw"],
                        "x_grouped_matmul": best["grouped matmul"] / best["gqa fused C++"],
                        "x_sdpa_enable_gqa": best["sdpa enable_gqa"] / best["gqa fused C++"],
                        "x_previous_path": best["gqa torch split-KV (previous path)"] / best["gqa fused C++"],
                    }
                    row["fused_ratios"] = ratios
                    row["goals_met"] = {key: ratios[key] >= goal for key, goal in CPU_DECODE_GOALS.items()}
                rows.append(row)
                del q, k, v, src, dst, peers, timed, yardstick
                bar.update(1)
        bar.close()
        try:
            compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=10).stdout
            compiler = compiler.splitlines()[0] if compiler else "unknown"
        except (OSError, subprocess.SubprocessError):
            compiler = "none found"
        prov = base_provenance(
            command,
            ",".join(dtypes),
            load_before=load_before,
            cpu=cpu_name(),
            cpu_cores=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            fused_kernel=fused_status,
            compiler=compiler,
            cflags=" ".join(cpu_fused.CFLAGS),
            rounds=rounds,
        )
        return {"provenance": prov, "goals": dict(CPU_DECODE_GOALS), "rows": rows}
    finally:
        torch.set_num_threads(previous_threads)


def cpu_decode_markdown(results: dict) -> str:
    p = results["provenance"]
    goals = results["goals"]
    lines = [
        "# CPU decode attention: the fused C++ kernel against the read bandwidth and torch",
        "",
        provenance_markdown(p).rstrip(),
        "- the machine's cores are shared with other work: see the load average above",
        f"- method: one decode step (Tq = 1, 32 q / 8 KV heads, D = 128); every peer and a streaming read "
        f"(`sum`) and copy of as many bytes run round-robin {p['rounds']} times; GB/s = KV bytes / best "
        "round. KV caches are >= 128 MiB, several times the last-level cache.",
        f"- goals (issue 11, measurements): fused >= {goals['of_read_bw']:.0%} of read bandwidth, >= "
        f"{goals['x_grouped_matmul']}x the grouped matmul, >= {goals['x_sdpa_enable_gqa']}x SDPA enable_gqa",
        "",
        "| dtype | case | read GB/s | implementation | best | median | GB/s | of read BW | fused speedup |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        fused = r["peers"].get("gqa fused C++")
        for name, m in r["peers"].items():
            speedup = f"{m['best_s'] / fused['best_s']:.2f}x" if fused and name != "gqa fused C++" else ""
            lines.append(
                f"| {r['dtype']} | {r['case']} | {r['read_gbps']:.1f} | {name} | {_fmt_time(m['best_s'])} | "
                f"{_fmt_time(m['median_s'])} | {m['gbps']:.1f} | {m['of_read_bw']:.0%} | {speedup} |"
            )
    lines += ["", "## Goals", "", "| dtype | case | of read BW | x grouped matmul | x SDPA enable_gqa | x previous |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for r in results["rows"]:
        if "fused_ratios" not in r:
            lines.append(f"| {r['dtype']} | {r['case']} | fused kernel not available | | | |")
            continue
        f, met = r["fused_ratios"], r["goals_met"]
        cells = [
            f"{f['of_read_bw']:.0%}",
            f"{f['x_grouped_matmul']:.2f}x",
            f"{f['x_sdpa_enable_gqa']:.2f}x",
        ]
        cells = [f"{c} {'(met)' if met[key] else '(NOT met)'}" for c, key in zip(cells, CPU_DECODE_GOALS, strict=True)]
        lines.append(f"| {r['dtype']} | {r['case']} | {' | '.join(cells)} | {f['x_previous_path']:.2f}x |")
    return "\n".join(lines) + "\n"


def cpu_decode_plot(results: dict, path: Path) -> None:
    """Grouped bars: GB/s of each implementation per (dtype, case), the read bandwidth as a marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays as it was

    rows = results["rows"]
    names = [n for n in CPU_DECODE_PEERS if any(n in r["peers"] for r in rows)]
    fig = Figure(figsize=(9, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / (len(names) + 1)
    xs = range(len(rows))
    ax.bar([x for x in xs], [r["read_gbps"] for r in rows], width, color="lightgrey", label="read bandwidth (sum)")
    for i, name in enumerate(names, start=1):
        vals = [r["peers"][name]["gbps"] if name in r["peers"] else 0.0 for r in rows]
        ax.bar([x + i * width for x in xs], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in xs], [f"{r['dtype']}\n{r['case']}" for r in rows])
    ax.set_ylabel("GB/s of KV cache read (best round)")
    p = results["provenance"]
    ax.set_title(
        f"CPU decode attention, 32 q / 8 KV heads, D = 128 — {p['cpu']}, {p['torch_threads']} threads\n"
        f"load {_load_text(p)}; {p['date'][:10]}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def write_cpu_decode_results(results: dict, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """``cpu-decode-<machine>-<date>-<HHMM UTC>.{json,md,png}`` under ``out_dir`` (each written to a temp file, then
    renamed). Existing results of the same name are replaced only with ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GQAUserError(f"--out {out_dir} is a file; pass a directory")
    p = results["provenance"]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{p['cpu']}-{p['cpu_cores']}c".lower()).strip("-")
    stem = f"cpu-decode-{slug}-{p['date'][:10]}-{p['date'][11:13]}{p['date'][14:16]}"  # -HHMM (UTC): runs of a day
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    _refuse_taken(paths, force)
    write_json_atomic(paths["json"], results)
    write_text_atomic(paths["md"], cpu_decode_markdown(results))
    with atomic_file(paths["png"]) as tmp:
        cpu_decode_plot(results, tmp)
    return paths
