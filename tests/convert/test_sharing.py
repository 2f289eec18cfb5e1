"""Memory of the calibrated path: the converted model shares every unchanged tensor with the source model,
distillation keeps that sharing and never modifies the teacher, a bf16 / fp16 model is held in its own
dtype and computes exactly as its float32 copy would."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gqa import GQAConfig, GQAForCausalLM, save_hf
from gqa.convert import convert
from gqa.convert.calibrated import collect_statistics, reduce_kv_heads
from gqa.convert.calibrated.distill import distill_local
from gqa.convert.calibrated.placement import placed, upcast_forward
from gqa.convert.calibrated.run import held_dtype
from gqa.errors import GQAUserError

VOCAB = 64


def teacher_model(*, tie: bool = False, dtype=torch.float32) -> GQAForCausalLM:
    torch.manual_seed(0)
    cfg = GQAConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64,
        tie_embeddings=tie, qkv_bias=tie,
    )  # fmt: skip
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
        for block in model.layers:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj):
                lin.weight.normal_(0, 0.25)
    return model.to(dtype)


def calib(n: int = 12, t: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


def convert_model(teacher, *, share: bool = True, compute_dtype=torch.float32):
    ids = calib()
    with upcast_forward(teacher, compute_dtype):
        stats = collect_statistics(teacher, ids, progress=False)
    student, _ = reduce_kv_heads(
        teacher, 2, stats, grouping="similarity", align=True, merge="mean", progress=False,
        share_unchanged=share, compute_dtype=compute_dtype, release_stats=True,
    )  # fmt: skip
    assert stats == [None, None]  # released layer by layer
    return student, ids


def unchanged_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if ".attn." not in n]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def assert_shared(teacher, student) -> None:
    t, s = (
        dict(teacher.named_parameters(remove_duplicate=False)),
        dict(student.named_parameters(remove_duplicate=False)),
    )
    for name in unchanged_names(teacher):
        assert s[name] is not t[name], name  # separate Parameter objects (own requires_grad, own .data swaps)
        assert s[name].data_ptr() == t[name].data_ptr() and s[name].dtype == t[name].dtype, name
    for name in t:
        if ".attn." in name:
            assert s[name].untyped_storage().data_ptr() != t[name].untyped_storage().data_ptr(), name


@pytest.mark.parametrize("tie", [False, True])
def test_student_shares_every_unchanged_tensor(tie):
    teacher = teacher_model(tie=tie)
    teacher.norm.weight.requires_grad_(False)
    before = snapshot(teacher)
    student, _ = convert_model(teacher)
    assert_shared(teacher, student)
    assert student.norm.weight.requires_grad is False and student.layers[0].mlp.up_proj.weight.requires_grad
    if tie:
        assert student.lm_head.weight is student.embed.weight  # still one parameter
    assert student.config.kv_heads_per_layer == [2, 2] and teacher.config.kv_heads_per_layer == [4, 4]
    assert all(b.attn.n_kv_heads == 4 for b in teacher.layers)
    assert_bitwise_equal(snapshot(teacher), before)


def test_default_is_a_full_copy():
    """Without share_unchanged nothing is shared: training the result can never touch the input model."""
    teacher = teacher_model(tie=True)
    student, _ = convert_model(teacher, share=False)
    ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not any(p.untyped_storage().data_ptr() in ptrs for p in student.parameters())
    assert student.lm_head.weight is student.embed.weight


@pytest.mark.parametrize("inputs", ["original", "converted"])
def test_distillation_keeps_sharing_and_the_teacher(inputs):
    teacher = teacher_model(tie=True)
    before = snapshot(teacher)
    student, ids = convert_model(teacher)
    attn_before = {k: v.clone() for k, v in student.state_dict().items() if ".attn." in k}
    report = distill_local(teacher, student, ids, steps=6, inputs=inputs, progress=False, device="cpu")
    # Strictly lower: the best state is kept, so "<=" would hold even if training never helped.
    assert report.error_after < report.error_before
    assert_shared(teacher, student)
    assert_bitwise_equal(snapshot(teacher), before)
    changed = [k for k, v in student.state_dict().items() if ".attn." in k and not torch.equal(v, attn_before[k])]
    assert changed  # the student's own attention weights were trained in place


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pair_distils_and_stays_shared(dtype):
    teacher = teacher_model(dtype=dtype)
    before = snapshot(teacher)
    student, ids = convert_model(teacher)
    assert student.layers[0].attn.q_proj.weight.dtype == torch.float32  # rebuilt in the compute dtype
    distill_local(teacher, student, ids, steps=4, progress=False, device="cpu")
    assert_shared(teacher, student)
    for name in unchanged_names(student):
        assert dict(student.named_parameters())[name].dtype == dtype, name
    assert all(p.dtype == dtype for p in teacher.parameters())
    assert_bitwise_equal(snapshot(teacher), before)
    # a student stored in half precision too: trained in float32, written back rounded, still half
    half, ids = convert_model(teacher, compute_dtype=None)
    q = half.layers[1].attn.q_proj.weight
    q0 = q.detach().clone()
    distill_local(teacher, half, ids, steps=4, progress=False, device="cpu")
    assert q.dtype == dtype and not torch.equal(q, q0)
    assert_shared(teacher, half)
    assert_bitwise_equal(snapshot(teacher), before)


@pytest.mark.parametrize("inputs", ["original", "converted"])
def test_bf16_held_teacher_gives_the_float32_result(inputs):
    """Holding a bf16 model and upcasting a layer at a time gives bit for bit what a float32 copy gives."""
    half = teacher_model(dtype=torch.bfloat16)
    full = teacher_model(dtype=torch.bfloat16).float()  # the exact float32 copy
    results = []
    for teacher in (half, full):
        student, ids = convert_model(teacher)
        report = distill_local(teacher, student, ids, steps=5, inputs=inputs, progress=False, device="cpu")
        attn = {k: v for k, v in student.state_dict().items() if ".attn." in k}
        results.append((attn, [(r.error_before, r.error_after) for r in report.layers]))
    assert_bitwise_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_a_student_sharing_attention_with_the_teacher_is_refused():
    teacher = teacher_model()
    with pytest.raises(GQAUserError, match="attention weights are the teacher's own tensors"):
        distill_local(teacher, teacher, calib(), steps=2, progress=False)


def test_placed_moves_copies_and_restores():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    other = torch.nn.Linear(4, 4).to(torch.bfloat16)
    other.weight = torch.nn.Parameter(lin.weight.data)  # a second parameter over the same storage
    w, b = lin.weight.data, lin.bias.data
    w0, b0 = w.clone(), b.clone()
    with placed(lin, other, dtype=torch.float32, write_back=[lin.bias]):
        assert lin.weight.dtype == torch.float32 and lin.weight.data_ptr() == other.weight.data_ptr()
        with torch.no_grad():
            lin.weight.add_(1.0)  # lands in the moved copy only
            lin.bias.add_(1.0)
    assert lin.weight.data_ptr() == w.data_ptr() and lin.weight.dtype == torch.bfloat16
    assert torch.equal(w, w0) and torch.equal(other.weight, w0)  # the shared original never written
    assert lin.bias.data_ptr() == b.data_ptr() and torch.equal(b, (b0.float() + 1).to(torch.bfloat16))
    m = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with placed(m, dtype=torch.float64):
            raise RuntimeError("boom")
    assert m.weight.dtype == torch.float32  # restored on error too


def test_upcast_forward_matches_a_float32_copy_and_leaves_no_copies():
    model = teacher_model(tie=True, dtype=torch.bfloat16)
    ids = calib(2, 8)
    with torch.no_grad():
        with upcast_forward(model):
            got = model(ids)
        want = teacher_model(tie=True, dtype=torch.bfloat16).float()(ids)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight


def test_converter_holds_half_precision_sources_and_matches_float32(tmp_path):
    """gqa convert with --distill on a bf16 folder (held in bf16) writes exactly what the same conversion
    of its float32 copy writes in bf16."""
    from gqa.data import save_tokenizer, train_bpe_tokenizer

    text = " ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(300))
    tok = train_bpe_tokenizer(text, vocab_size=300)
    (tmp_path / "calib.txt").write_text(text)
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64)
    model = GQAForCausalLM(cfg).to(torch.bfloat16)
    save_hf(model, tmp_path / "bf16")
    save_hf(model.float(), tmp_path / "f32")
    outs = {}
    for name in ("bf16", "f32"):
        save_tokenizer(tok, tmp_path / name)
        outs[name] = tmp_path / f"out-{name}"
        convert(
            tmp_path / name, outs[name], kv_heads=2, calib=str(tmp_path / "calib.txt"), calib_tokens=1024,
            seq_len=64, distill="local", distill_steps=4, dtype="bfloat16", progress=False,
        )  # fmt: skip
    assert held_dtype(tmp_path / "bf16") == torch.bfloat16 and held_dtype(tmp_path / "f32") == torch.float32
    a, b = (load_file(outs[n] / "model.safetensors") for n in ("bf16", "f32"))
    assert_bitwise_equal(a, b)
    ra, rb = (json.loads((outs[n] / "conversion_report.json").read_text())["distill"]["layers"] for n in outs)
    assert [r["error_after"] for r in ra] == [r["error_after"] for r in rb]
