"""Shared test helpers (imported as ``from helpers import ...``): head configurations, the torch
baseline whose error sets each tolerance, and the fp64-reference assertion."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from gqa.masks import as_bool_mask
from gqa.reference import reference_attention, repeat_kv

HEAD_CONFIGS = [(8, 8), (8, 4), (8, 2), (8, 1), (9, 3), (12, 3)]
HEAD_IDS = [f"Hq{hq}-Hkv{hkv}" for hq, hkv in HEAD_CONFIGS]


def torch_baseline(q, k, v, mask=None, scale=None):
    """What PyTorch itself computes at q's dtype: repeat K/V, then SDPA's math path. NaN rows -> 0."""
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    m = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=k.shape[2], device=q.device)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=m, scale=scale)
    return torch.nan_to_num(out, nan=0.0)


def assert_matches_reference(out, q, k, v, mask=None, scale=None, factor: float = 4.0):
    """|out - fp64 reference| <= factor x PyTorch's own error at this dtype (+ a floor of a few ulps)."""
    ref = reference_attention(q, k, v, mask=mask, scale=scale)
    assert out.shape == ref.shape
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all(), "output has NaN/inf"
    err = (out.double() - ref).abs().max().item()
    base = (torch_baseline(q, k, v, mask, scale).double() - ref).abs().max().item()
    floor = 2 * torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
    tol = factor * base + floor
    assert err <= tol, f"max error {err:.3g} exceeds {tol:.3g} (torch's own error {base:.3g})"


# --- tiny random transformers checkpoints (no download), shared by the convert and model tests ---

HIDDEN, HQ, D = 32, 8, 4  # head_dim 4: 8 query heads
TOKENS = torch.tensor([[3, 17, 5, 60, 9, 22, 41, 7, 33, 12]])

# (model_type, config overrides): every listed family, with its bias / norm options switched on.
FAMILIES = {
    "llama": {"attention_bias": True},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"attention_bias": True},
    "gemma": {},
    "olmo": {},
    "olmo2": {},
    "granite": {"attention_bias": True},
    "stablelm": {"use_qkv_bias": True, "qk_layernorm": True},
    "phi3": {},
}


def build(model_type: str, n_kv: int = 4, layers: int = 2, seed: int = 0, **over):
    """A tiny random transformers model of ``model_type`` with HQ query heads and ``n_kv`` KV heads."""
    cfg = dict(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=HQ,
        num_key_value_heads=n_kv,
        head_dim=D,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    cfg |= FAMILIES.get(model_type, {}) | over
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()
    with torch.no_grad():  # norms and biases start at 0/1: randomize so a wrong map cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


def logits(folder_or_model):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model).eval()
    with torch.no_grad():
        return model(TOKENS).logits


# --- a tiny gqa decoder with peaked, input-dependent logits (generation, scheduler and paged-cache tests) ---


def tiny_gqa(n_kv=2, seed=0, *, max_seq_len: int = 96, **kw):
    """A 2-layer :class:`gqa.GQAForCausalLM` (vocab 97, d_model 64, 8 query heads, ``n_kv`` KV heads) in eval
    mode, weights drawn from N(0, 0.15) (norms left at 1) so that greedy decoding depends on the input."""
    from gqa import GQAConfig, GQAForCausalLM

    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=8, n_kv_heads=n_kv, ffn_dim=96, max_seq_len=max_seq_len, **kw
    )
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked, input-dependent logits
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


# --- fuzzing model folders (issue 12): config.json values and safetensors header edits ---

CONFIG_KEYS = [
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "head_dim",
    "model_type",
    "attention_bias",
    "per_layer_config",
]
JSON_VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, -1, 10**9, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-4, 64), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 9), max_size=2),
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3", "Q4", "", "f32"])
ENTRY_EDITS = st.one_of(
    st.fixed_dictionaries({"dtype": DTYPES}),
    st.fixed_dictionaries({"shape": st.lists(st.integers(-8, 70), max_size=3)}),
    st.fixed_dictionaries({"data_offsets": st.lists(st.integers(-16, 2**20), min_size=0, max_size=3)}),
    st.fixed_dictionaries({"shape": JSON_VALUES}),
    st.fixed_dictionaries({"data_offsets": JSON_VALUES}),
)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def corrupt_copy(pristine: Path, src: Path, config_edits: dict, header_edits: list, entry_replacement) -> None:
    """Copy the model folder ``pristine`` to ``src``, then merge ``config_edits`` into its config.json and
    apply hypothesis' header edits to its model.safetensors (``(index, changes)`` pairs updating entries,
    and optionally one entry replaced by an arbitrary JSON value)."""
    import shutil

    shutil.copytree(pristine, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | config_edits))

    def edit(header):
        names = sorted(k for k in header if k != "__metadata__")
        for i, change in header_edits:
            header[names[i % len(names)]].update(change)
        if entry_replacement is not None:
            i, value = entry_replacement
            header[names[i % len(names)]] = value

    rewrite_header(src / "model.safetensors", edit)


def decode_mask(lengths, tq, t_max, causal=True, window=None, chunk=None):
    """Bool [B, 1, Tq, T_max] of what each decode query may see: token t of sequence b sits at
    lengths[b] - Tq + t (bottom-right) and sees keys < lengths[b], within the window / chunk."""
    from gqa import masks

    q_pos = lengths.long()[:, None] - tq + torch.arange(tq)[None, :]  # (B, Tq)
    m = masks.key_padding(lengths.long())
    if causal:
        m = m & masks.causal()
    if window is not None:
        m = m & masks.sliding_window(window)
    if chunk is not None:
        m = m & masks.chunked(chunk)
    return m.materialize(tq, t_max, q_positions=q_pos).expand(len(lengths), 1, tq, t_max)


def poison_invisible(x, bool_mask):
    """NaN in every key slot no query of that sequence may see: reading one would show in the output."""
    never = ~bool_mask.any(dim=2)[:, :, :, None]  # (B, 1, T, 1)
    return x.masked_fill(never.to(x.device), float("nan"))


# --- running the real CLI in a fresh process ---

RUN = "import sys; from gqa.cli import main; sys.argv[0] = 'gqa'; main()"


def gqa_cli(args: list[str], cwd: Path, *, stdin: str | None = None, timeout: float = 240, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), "GQA_PROGRESS": "1", **(env or {})},
    )


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def assert_one_line_refusal(res, needle: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    return lines[0]


class CharTokenizer:
    """Just enough of a transformers tokenizer for the CLI tests: one token per character."""

    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 97 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)
