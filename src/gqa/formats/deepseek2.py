"""DeepSeek-V2's latent layout: a gqa latent model (:mod:`gqa.latent`) as a transformers folder
(``DeepseekV2ForCausalLM``, dense MLPs, loaded with no custom code) and as a GGUF of llama.cpp's ``deepseek2``
architecture (whose cache holds the latent and the rotated key: MLA).

What the files can express, and so what gqa checks before writing:

* **One rotated key head** shared by every query head (``qk_rope_head_dim`` dims), at the frequencies
  ``base ** (-2 i / qk_rope_head_dim)``: a latent converted with ``--latent-rope shared`` (its config has
  ``n_kv_heads = 1`` and every layer keeps the pairs ``0, s, 2s, ...`` of the original head), written with
  ``rope_theta = theta ** (s * rope_dim / head_dim)`` so each pair keeps its frequency. Pairs are
  interleaved in these files (dims 2i, 2i + 1) and in halves in gqa (i, i + rope_dim / 2).
* **One latent rank** for every layer (``kv_lora_rank``), no q/k/v/o or MLP biases, SwiGLU, no Gemma norms.
* **An RMSNorm over the latent** (``kv_a_layernorm``), which every DeepSeek-V2 file has. A latent with
  ``latent_norm`` writes its own (transformers fixes that norm's epsilon at 1e-6, llama.cpp uses the
  model's). A latent without one is written so that the norm is linear to within a relative 1e-6: the
  down-projection is scaled by a small s such that mean(c^2) stays below 1e-6 x epsilon for every input
  the layer can see (bounded from the weights: ``|x| <= sqrt(d) max|attn_norm|``), and the norm's weight is
  ``sqrt(epsilon) / s``. Float16 cannot hold the scaled weights; such a model is written in float32 or
  bfloat16 (its GGUF keeps that one tensor in F32).

Tensor layout per layer (gqa -> transformers -> GGUF):

=======================================  ======================================  =====================
``q_proj`` [Hq*D, d] (head: nope|rope)   ``self_attn.q_proj``                    ``attn_q``
``kv_down`` [R, d] + ``k_rope_proj``     ``self_attn.kv_a_proj_with_mqa``        ``attn_kv_a_mqa``
[r, d]                                   [R + r, d]
(latent norm)                            ``self_attn.kv_a_layernorm`` [R]        ``attn_kv_a_norm``
``k_up`` [Hq*(D-r), R], ``v_up``         ``self_attn.kv_b_proj`` [Hq*(2D-r), R]  ``attn_k_b`` [Hq, R,
[Hq*D, R]                                (per head: k rows, then v rows)         D-r], ``attn_v_b``
                                                                                 [Hq, D, R]
``o_proj``                               ``self_attn.o_proj``                    ``attn_output``
=======================================  ======================================  =====================

Every other tensor is a Llama block's. The softmax scale of both engines is ``1 / sqrt(D)``; a model with
another scale has the difference folded into its queries.

**Reading a folder back** (:func:`load_deepseek_v2`, what :func:`gqa.model.load_model` calls for
``model_type: deepseek_v2``) inverts the table for the files this layout can hold in gqa's latent layer:
dense MLPs only (no experts), queries in one projection (``q_lora_rank: null``), ``v_head_dim`` equal to
``qk_nope_head_dim + qk_rope_head_dim``, plain RoPE (no YaRN), no biases. The file's rotated frequencies
``base ** (-2 i / r)`` are the first r / 2 pairs of a D-dim head at ``theta = base ** (D / r)``; the latent
norm keeps transformers' epsilon (1e-6). Anything else is a one-line error naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from gqa.errors import GQAUserError

__all__ = [
    "check_deepseek2",
    "deepseek2_rope_theta",
    "hf_config",
    "hf_tensors",
    "save_deepseek_v2",
    "load_deepseek_v2",
    "gguf_tensors",
    "write_gguf_fields",
]

#: transformers' DeepseekV2RMSNorm(kv_lora_rank) takes its default epsilon, not the config's.
HF_LATENT_NORM_EPS = 1e-6
#: The latent's mean square, as a share of the norm's epsilon, below which the norm is linear (module doc).
LINEAR_MARGIN = 1e-6


def check_deepseek2(model, dtype: torch.dtype | None = None) -> None:
    """A one-line error for a latent model DeepSeek-V2's files cannot hold (module doc)."""
    cfg = model.config
    fix = "convert with --kv-latent R --latent-rope shared (one rank for every layer)"
    if cfg.latent_rank is None:
        raise GQAUserError(
            "DeepSeek-V2's layout holds latent models; this one has KV heads: export it as hf, decilm or gguf"
        )
    for bad, what in (
        (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias, "biases"),
        (cfg.hidden_act != "silu", f"a {cfg.hidden_act} MLP"),
        (cfg.sandwich_norm or cfg.embed_scale is not None, "Gemma's norms"),
        (cfg.qk_norm, "QK-norm (a key norm over the whole head)"),
        (cfg.sliding_window is not None, "sliding-window layers"),
    ):
        if bad:
            raise GQAUserError(f"DeepSeek-V2 files cannot hold {what}; export this latent model with --export gqa")
    if set(cfg.kv_heads_per_layer) != {1}:
        raise GQAUserError(
            f"DeepSeek-V2 files have one rotated key head shared by all heads, this model has one per KV group; {fix}"
        )
    if len(set(cfg.latent_ranks)) != 1:
        raise GQAUserError(
            f"DeepSeek-V2 files take one latent rank (kv_lora_rank) for every layer, this model's differ; {fix}"
        )
    r, d = cfg.latent_rope_dim, cfg.resolved_head_dim
    if not 2 <= r < d:
        raise GQAUserError(
            f"DeepSeek-V2 files need 2 to {d - 2} rotated dims (qk_rope_head_dim), this model has {r}; {fix} and --latent-rope-dim 16"
        )
    deepseek2_rope_theta(model)  # evenly spaced pairs from 0, the same in every layer
    if not cfg.latent_norm and dtype == torch.float16:
        raise GQAUserError(
            "float16 cannot hold the linear-norm scaling of a latent without latent_norm; use --dtype bfloat16 or float32"
        )


def deepseek2_rope_theta(model) -> float:
    """The RoPE base at which the file's rotated dims keep the frequencies of the pairs the layers rotate
    (``theta ** (s * r / D)`` for pairs 0, s, 2s, ...), or a one-line error if they are not so."""
    cfg = model.config
    r, d = cfg.latent_rope_dim, cfg.resolved_head_dim
    pairs = {tuple(block.attn.rope_pairs.view(-1).tolist()) for block in model.layers}
    kept = pairs.pop() if len(pairs) == 1 else ()
    stride = kept[1] if len(kept) > 1 else 1
    if not kept or stride < 1 or kept != tuple(stride * i for i in range(len(kept))):
        raise GQAUserError(
            "DeepSeek-V2 files rotate evenly spaced frequencies from the highest, one set for every layer; this latent "
            "rotates others: convert with --latent-rope shared"
        )
    return float(cfg.rope_theta) ** (stride * r / d)


def _interleave(w: torch.Tensor, r: int) -> torch.Tensor:
    """The last r rows of each [.., r] block: halves (i, i + r/2) -> interleaved pairs (2i, 2i + 1)."""
    return w.reshape(*w.shape[:-2], 2, r // 2, w.shape[-1]).transpose(-3, -2).reshape(w.shape)


def _norm_scale(block, eps: float) -> tuple[float, torch.Tensor]:
    """``(s, norm weight)``: the factor on the down-projection and the latent norm's weight (module doc)."""
    attn = block.attn
    if attn.latent_norm is not None:
        return 1.0, attn.latent_norm.weight.detach()
    w = attn.kv_down.weight.detach().double()
    x_norm_sq = w.shape[1] * block.attn_norm.weight.detach().double().abs().max().item() ** 2
    mean_sq = torch.linalg.matrix_norm(w, ord=2).item() ** 2 * x_norm_sq / w.shape[0]  # max over inputs of mean(c^2)
    s = math.sqrt(LINEAR_MARGIN * eps / max(mean_sq, 1e-300))
    return s, torch.full((w.shape[0],), math.sqrt(eps) / s, dtype=torch.float32)


def _attention(block, eps: float) -> dict[str, torch.Tensor]:
    """One layer's attention tensors under transformers' names (after ``self_attn.``)."""
    attn = block.attn
    h, d, r, rank = attn.n_heads, attn.head_dim, attn.rope_dim, attn.rank
    q = attn.q_proj.weight.detach().view(h, d, -1)
    q = torch.cat([q[:, : d - r], _interleave(q[:, d - r :], r)], dim=1) * (attn.scale * math.sqrt(d))
    s, norm = _norm_scale(block, eps)
    kv_a = torch.cat([attn.kv_down.weight.detach() * s, _interleave(attn.k_rope_proj.weight.detach(), r)])
    k_b, v_b = attn.k_up.weight.detach().view(h, d - r, rank), attn.v_up.weight.detach().view(h, d, rank)
    return {
        "q_proj.weight": q.reshape(h * d, -1),
        "kv_a_proj_with_mqa.weight": kv_a,
        "kv_a_layernorm.weight": norm,
        "kv_b_proj.weight": torch.cat([k_b, v_b], dim=1).reshape(-1, rank),
        "o_proj.weight": attn.o_proj.weight.detach(),
    }


def hf_tensors(model, *, latent_norm_eps: float = HF_LATENT_NORM_EPS) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers name, tensor) for every tensor of the DeepSeek-V2 folder (module doc's table)."""
    from gqa.families.llama import weight_map

    cfg = model.config
    state = model.state_dict()
    for ours, theirs in weight_map(cfg).items():
        if ".self_attn." not in theirs:
            yield theirs, state[ours].detach()
    for i, block in enumerate(model.layers):
        for name, t in _attention(block, latent_norm_eps).items():
            yield f"model.layers.{i}.self_attn.{name}", t


def hf_config(model) -> dict:
    """The ``config.json`` of the DeepSeek-V2 folder: every layer dense (``first_k_dense_replace``), queries
    without a low-rank step (``q_lora_rank: null``), K/V expanded to Hq heads."""
    cfg = model.config
    d, r = cfg.resolved_head_dim, cfg.latent_rope_dim
    theta = deepseek2_rope_theta(model)
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "mlp_bias": False,
        "q_lora_rank": None,
        "kv_lora_rank": cfg.latent_ranks[0],
        "qk_nope_head_dim": d - r,
        "qk_rope_head_dim": r,
        "v_head_dim": d,
        "first_k_dense_replace": cfg.n_layers,
        "n_shared_experts": 0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def save_deepseek_v2(
    model, folder: str | Path, *, dtype: torch.dtype | None = None, side_files_from=None, force: bool = False
) -> Path:
    """Write a latent ``model`` as a transformers ``DeepseekV2ForCausalLM`` folder, atomically."""
    from safetensors.torch import save_file

    from gqa.atomic import atomic_dir
    from gqa.formats.transformers.folder import copy_side_files
    from gqa.units import dtype_name

    check_deepseek2(model, dtype)
    eps = latent_norm_eps(model.config)
    if model.config.latent_norm and eps != HF_LATENT_NORM_EPS:
        raise GQAUserError(
            f"transformers' DeepSeek-V2 fixes the latent norm's epsilon at {HF_LATENT_NORM_EPS}, this model's is "
            f"{eps}; export it with --export gguf or gqa"
        )
    out_dtype = dtype or next(model.parameters()).dtype
    folder = Path(folder)
    with atomic_dir(folder, force=force) as tmp, torch.no_grad():
        tensors = {name: t.to(out_dtype).contiguous().cpu() for name, t in hf_tensors(model)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {**hf_config(model), "torch_dtype": dtype_name(out_dtype)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
    return folder


def latent_norm_eps(cfg) -> float:
    """The latent norm's epsilon of a :class:`gqa.GQAConfig` (its own, or the model's)."""
    return cfg.norm_eps if cfg.latent_norm_eps is None else cfg.latent_norm_eps


def _deinterleave(w: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`_interleave`: interleaved pairs (2i, 2i + 1) -> halves (i, i + r/2), rows of [r, ..]."""
    return w.reshape(r // 2, 2, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _read_config(cfg: dict, where: str):
    """The :class:`gqa.GQAConfig` of a DeepSeek-V2 ``config.json`` (module doc: what gqa reads back)."""
    from gqa.families.llama import rope_theta
    from gqa.model.config import GQAConfig

    def need(key, ok, fix):
        if not ok(cfg.get(key)):
            raise GQAUserError(f"{where}: {key}={cfg.get(key)!r}; gqa reads DeepSeek-V2 folders with {fix}")

    n_layers = cfg.get("num_hidden_layers")
    need("num_hidden_layers", lambda v: isinstance(v, int) and v > 0, "a positive layer count")
    need("first_k_dense_replace", lambda v: isinstance(v, int) and v >= n_layers, f"every layer dense (first_k_dense_replace >= {n_layers}; experts are not read)")
    need("q_lora_rank", lambda v: v is None, "queries in one projection (q_lora_rank null)")
    need("attention_bias", lambda v: not v, "no attention biases")
    need("hidden_act", lambda v: v in (None, "silu"), "a SwiGLU MLP (hidden_act silu)")
    for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"):
        need(key, lambda v: isinstance(v, int) and v > 0, "positive head sizes and rank")
    nope, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    need("qk_rope_head_dim", lambda v: v % 2 == 0, "an even number of rotated dims")
    need("v_head_dim", lambda v: v == nope + r, f"values as wide as keys (v_head_dim = {nope + r}: gqa's latent layer has one head width)")
    base = rope_theta(cfg)  # refuses scaled RoPE (YaRN) in one line
    d = nope + r
    return GQAConfig(
        vocab_size=cfg.get("vocab_size"), d_model=cfg.get("hidden_size"), n_layers=n_layers,
        n_heads=cfg.get("num_attention_heads"), n_kv_heads=1, head_dim=d, ffn_dim=cfg.get("intermediate_size"),
        max_seq_len=cfg.get("max_position_embeddings", 4096), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(base) ** (d / r), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        latent_rank=cfg["kv_lora_rank"], latent_rope_dim=r, latent_norm=True, latent_norm_eps=HF_LATENT_NORM_EPS,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )  # fmt: skip


def _state_from_tensors(config, get) -> dict[str, torch.Tensor]:
    """gqa's state dict from a DeepSeek-V2 folder's tensors (``get(name)``; module doc's table, inverted)."""
    from gqa.families.llama import weight_map

    state = {ours: get(theirs) for ours, theirs in weight_map(config).items() if ".self_attn." not in theirs}
    h, d, r, rank = config.n_heads, config.resolved_head_dim, config.latent_rope_dim, config.latent_ranks[0]
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.self_attn.", f"layers.{i}.attn."
        q = get(hf + "q_proj.weight").view(h, d, -1)
        q = torch.cat([q[:, : d - r], torch.stack([_deinterleave(q[j, d - r :], r) for j in range(h)])], dim=1)
        kv_a = get(hf + "kv_a_proj_with_mqa.weight")
        kv_b = get(hf + "kv_b_proj.weight").view(h, 2 * d - r, rank)
        state |= {
            ours + "q_proj.weight": q.reshape(h * d, -1),
            ours + "kv_down.weight": kv_a[:rank],
            ours + "k_rope_proj.weight": _deinterleave(kv_a[rank:], r),
            ours + "latent_norm.weight": get(hf + "kv_a_layernorm.weight"),
            ours + "k_up.weight": kv_b[:, : d - r].reshape(h * (d - r), rank),
            ours + "v_up.weight": kv_b[:, d - r :].reshape(h * d, rank),
            ours + "o_proj.weight": get(hf + "o_proj.weight"),
            ours + "rope_pairs": torch.arange(r // 2).view(1, r // 2),  # the head's first pairs (module doc)
        }
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def load_deepseek_v2(folder: str | Path, *, dtype: torch.dtype | None = None):
    """A :class:`gqa.GQAForCausalLM` with latent layers from a DeepSeek-V2 transformers folder (what
    :func:`save_deepseek_v2` writes, or any the module doc says gqa reads); float32 unless ``dtype`` says.
    Every tensor is checked for presence and shape, and nothing may be left over."""
    from gqa.formats.transformers.safetensors import read_folder, read_tensor
    from gqa.model.decoder import GQAForCausalLM
    from gqa.model.files import read_json_object

    folder = Path(folder)
    config = _read_config(read_json_object(folder / "config.json"), str(folder / "config.json"))
    model = GQAForCausalLM(config).to(dtype or torch.float32)
    own = model.state_dict()
    infos = {i.name: i for shard in read_folder(folder) for i in shard}
    handles: dict = {}
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in infos:
            raise GQAUserError(f"{folder} has no tensor {name}; the folder is incomplete or not DeepSeek-V2's layout")
        if infos[name].file not in handles:
            handles[infos[name].file] = open(infos[name].file, "rb")
        used.add(name)
        return read_tensor(infos[name], handles[infos[name].file]).to(next(model.parameters()).dtype)

    try:
        state = _state_from_tensors(config, get)
    except RuntimeError as e:  # a view of the wrong size: a tensor's shape does not match config.json
        raise GQAUserError(f"{folder}: a tensor's shape does not match config.json ({str(e).splitlines()[0]})") from None
    finally:
        for f in handles.values():
            f.close()
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied head may be stored too
    extra = sorted(set(infos) - used - ignored)
    if extra:
        raise GQAUserError(f"{folder} holds {len(extra)} tensors gqa does not read (first: {extra[0]}); experts and other layouts are not read")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise GQAUserError(f"{folder}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's deepseek2)

_GGUF_ATTENTION = {
    "q_proj": "attn_q",
    "kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "kv_a_layernorm": "attn_kv_a_norm",
    "o_proj": "attn_output",
}


def gguf_tensors(model) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Yield (llama.cpp name, tensor, keep in F32) in file order: Llama-block names outside attention, the
    latent's tensors as the module doc's table (kv_b split into ``attn_k_b`` and ``attn_v_b``)."""
    from gqa.families.llama import GGUF_LAYER_TENSORS, gguf_tensor_map

    cfg = model.config
    state = model.state_dict()
    attention = {f"layers.{i}.{k}" for i in range(cfg.n_layers) for k in GGUF_LAYER_TENSORS if k.startswith("attn.")}
    linear_norm = not cfg.latent_norm  # the scaled down-projection is below float16's range: F32
    for ours, theirs in gguf_tensor_map(cfg).items():
        if ours not in attention:
            yield theirs, state[ours].detach(), False
        if ours.endswith("attn_norm.weight"):  # the layer's attention tensors follow its norm
            i = int(ours.split(".")[1])
            yield from _gguf_attention(model.layers[i], i, cfg.norm_eps, linear_norm)


def _gguf_attention(block, i: int, eps: float, linear_norm: bool):
    attn = block.attn
    h, d, r, rank = attn.n_heads, attn.head_dim, attn.rope_dim, attn.rank
    tensors = _attention(block, eps)
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm"):
        yield (
            f"blk.{i}.{_GGUF_ATTENTION[name]}.weight",
            tensors[f"{name}.weight"],
            linear_norm and name == "kv_a_proj_with_mqa",
        )
    kv_b = tensors["kv_b_proj.weight"].view(h, 2 * d - r, rank)
    yield f"blk.{i}.attn_k_b.weight", kv_b[:, : d - r].transpose(1, 2).contiguous(), False  # (Hq, R, D-r)
    yield f"blk.{i}.attn_v_b.weight", kv_b[:, d - r :].contiguous(), False  # (Hq, D, R)
    yield f"blk.{i}.attn_output.weight", tensors["o_proj.weight"], False


def write_gguf_fields(writer, model) -> None:
    """The ``deepseek2.*`` metadata of a latent model (what llama.cpp's deepseek2 loader reads)."""
    cfg = model.config
    d, r, rank = cfg.resolved_head_dim, cfg.latent_rope_dim, cfg.latent_ranks[0]
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(1)  # MLA: one "KV head", the latent row
    writer.add_key_length(rank + r)
    writer.add_value_length(rank)
    writer.add_key_length_mla(d)
    writer.add_value_length_mla(d)
    writer.add_rope_dimension_count(r)
    writer.add_rope_freq_base(deepseek2_rope_theta(model))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(cfg.n_layers)
    writer.add_q_lora_rank(0)  # queries in one projection (attn_q)
    writer.add_kv_lora_rank(rank)
    writer.add_expert_feed_forward_length(cfg.ffn_dim)
    writer.add_expert_shared_count(0)
    writer.add_expert_count(0)
    writer.add_expert_used_count(0)
