"""The demo behind ``gqa demo``: MHA vs GQA vs MQA on one small decoder (random weights).

Builds the same 8-head model with 8, 4, 2 and 1 KV heads, checks that each attention path
matches the fp64 reference, and measures KV-cache bytes per token and decode speed at a given
context length.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from gqa.functional import attention
from gqa.model import GQAConfig, GQAForCausalLM
from gqa.reference import reference_attention


def _decode_tokens_per_s(model: GQAForCausalLM, context: int, steps: int, batch: int = 1) -> float:
    cache = model.make_cache(batch, context + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    with torch.inference_mode():
        model(ids, cache=cache)  # prefill
        tok = ids[:, -1:]
        model(tok, cache=cache)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    return batch * steps / dt


def attention_demo(*, context: int = 2048, steps: int = 32, seed: int = 0, console: Console | None = None):
    """Print a table of KV heads, KV bytes per token, cache size, max error vs fp64 and decode tokens/s."""
    if context < 1 or steps < 1:
        raise ValueError("context and steps must be >= 1")
    console = console or Console()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = Table(title=f"MHA vs GQA vs MQA: d_model 512, 8 query heads, 4 layers, context {context} (fp32, CPU)")
    for col in ("variant", "KV heads", "g", "KV bytes/token", "cache @ context", "max |err| vs fp64", "decode tok/s"):
        table.add_column(col, justify="right")
    rows = []
    for hkv in (8, 4, 2, 1):
        cfg = GQAConfig(
            vocab_size=4096,
            d_model=512,
            n_layers=4,
            n_heads=8,
            n_kv_heads=hkv,
            ffn_dim=1376,
            max_seq_len=context + steps + 1,
        )
        model = GQAForCausalLM(cfg).eval()
        q = torch.randn(1, 8, 4, 64)
        k, v = torch.randn(1, hkv, context, 64), torch.randn(1, hkv, context, 64)
        from gqa import masks

        err = (
            (attention(q, k, v, mask=masks.causal()).double() - reference_attention(q, k, v, mask=masks.causal()))
            .abs()
            .max()
            .item()
        )
        per_tok = cfg.kv_bytes_per_token(torch.float32)
        tps = _decode_tokens_per_s(model, context, steps)
        name = {8: "MHA", 1: "MQA"}.get(hkv, f"GQA-{hkv}")
        rows.append((name, hkv, tps))
        table.add_row(
            name,
            str(hkv),
            str(8 // hkv),
            f"{per_tok / 1024:.0f} KiB",
            f"{per_tok * context / 2**20:.1f} MiB",
            f"{err:.1e}",
            f"{tps:.0f}",
        )
    console.print(table)
    base = rows[0][2]
    console.print("Decode speed-up over MHA: " + ", ".join(f"{n} x{t / base:.2f}" for n, _, t in rows[1:]))
    return rows
