"""gqa.train: schedule, accumulation, distillation, exact resume after a kill, outputs, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from gqa import GQAConfig, GQAForCausalLM, load_hf
from gqa.errors import GQAUserError
from gqa.evaluate import kl_to_teacher
from gqa.train import CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME, TrainConfig, train, uptrain, uptrain_tokens

VOCAB = 64


def tiny_model(n_kv_heads: int = 4, seed: int = 0) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, max_seq_len=64
    )
    return GQAForCausalLM(cfg)


def learnable_ids(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """A stream with structure to learn: a short random motif repeated with noise."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (13,), generator=g)
    ids = motif.repeat(n // 13 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return ids


def small_config(**kw) -> TrainConfig:
    base = dict(steps=6, seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=2, eval_tokens=200)
    return TrainConfig(**{**base, **kw})


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # then never rising
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert cfg.lr_at(100) == pytest.approx(0.1)


def test_config_for_tokens_rounds_up_to_whole_steps():
    cfg = TrainConfig.for_tokens(1000, seq_len=16, batch_size=4)
    assert cfg.steps == 16 and cfg.steps * cfg.tokens_per_step >= 1000
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp8")


def test_training_lowers_loss_and_writes_a_loadable_folder(tmp_path):
    model = tiny_model()
    ids = learnable_ids()
    res = train(
        model, ids, tmp_path / "out", small_config(steps=30, checkpoint_every=10), val_ids=ids[:300], progress=False
    )
    records = [json.loads(x) for x in (tmp_path / "out" / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert res.validation.perplexity < VOCAB / 4
    out = tmp_path / "out"
    assert not (out / CHECKPOINT_NAME).exists()  # removed once the run is complete
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["tokens"] == 30 * 64 and summary["provenance"]["git_commit"]
    reloaded = load_hf(out)
    x = ids[:20].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    ids = learnable_ids()
    a, b = tiny_model(), tiny_model()
    ra = train(a, ids, tmp_path / "a", small_config(steps=2, grad_accum=1), progress=False)
    rb = train(b, ids, tmp_path / "b", small_config(steps=2, grad_accum=4), progress=False)
    assert ra.history[0]["loss"] == pytest.approx(rb.history[0]["loss"], rel=1e-6)
    assert ra.final_loss == pytest.approx(rb.final_loss, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


class Killed(Exception):
    pass


def _kill_at(step_to_die: int):
    def hook(step, record):
        if step == step_to_die:
            raise Killed

    return hook


def test_resume_after_a_kill_reaches_the_same_final_loss(tmp_path):
    ids = learnable_ids()
    cfg = small_config(steps=7, checkpoint_every=2)
    full = train(tiny_model(), ids, tmp_path / "full", cfg, progress=False)

    with pytest.raises(Killed):  # the last checkpoint is at step 4; step 5 is logged, then lost
        train(tiny_model(), ids, tmp_path / "run", cfg, progress=False, on_step_end=_kill_at(5))
    assert (tmp_path / "run" / CHECKPOINT_NAME).is_file()
    with pytest.raises(GQAUserError, match="unfinished run; pass --resume"):
        train(tiny_model(), ids, tmp_path / "run", cfg, progress=False)
    # A fresh process would rebuild the model from its source; the checkpoint overrides the weights.
    resumed = train(tiny_model(seed=123), ids, tmp_path / "run", cfg, resume=True, progress=False)
    assert resumed.final_loss == full.final_loss  # bit for bit
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / METRICS_NAME).read_text().splitlines()]
    assert steps == list(range(1, 8))
    full_w = load_hf(tmp_path / "full").state_dict()
    for name, t in load_hf(tmp_path / "run").state_dict().items():
        assert torch.equal(t, full_w[name]), name


def test_resume_on_other_data_or_teacher_is_refused(tmp_path):
    """A resume used to accept other --data, another --teacher or none, and keep training without a word."""
    ids = learnable_ids()
    cfg = small_config(steps=4, checkpoint_every=2)
    teacher = tiny_model(seed=7)
    with pytest.raises(Killed):
        train(tiny_model(), ids, tmp_path / "run", cfg, teacher=teacher, progress=False, on_step_end=_kill_at(3))
    ckpt = (tmp_path / "run" / CHECKPOINT_NAME).read_bytes()
    cases = [
        (dict(train_ids=learnable_ids(seed=1), teacher=teacher), "train data differ"),
        (dict(train_ids=ids, teacher=None), "teacher differ"),
        (dict(train_ids=ids, teacher=tiny_model(seed=8)), "teacher differ"),
        (dict(train_ids=ids, teacher=teacher, val_ids=ids[:500]), "validation data differ"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(GQAUserError, match=needle):
            train(tiny_model(), out_dir=tmp_path / "run", config=cfg, resume=True, progress=False, **kwargs)
        assert (tmp_path / "run" / CHECKPOINT_NAME).read_bytes() == ckpt  # refused before anything moved
    res = train(tiny_model(), ids, tmp_path / "run", cfg, teacher=teacher, resume=True, progress=False)
    assert res.steps == 4


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    ids = learnable_ids()
    cfg = small_config(steps=4, checkpoint_every=2)
    with pytest.raises(Killed):
        train(tiny_model(), ids, tmp_path / "run", cfg, progress=False, on_step_end=_kill_at(3))
    ckpt = tmp_path / "run" / CHECKPOINT_NAME
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt"):
        train(tiny_model(), ids, tmp_path / "run", cfg, resume=True, progress=False)
    assert ckpt.read_bytes() == data[: len(data) // 2]  # nothing overwritten
    with pytest.raises(ValueError, match="training settings differ"):
        ckpt.write_bytes(data)
        train(
            tiny_model(), ids, tmp_path / "run", small_config(steps=5, checkpoint_every=2), resume=True, progress=False
        )


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path):
    ids = learnable_ids()
    teacher = tiny_model(seed=1)
    train(teacher, ids, tmp_path / "teacher", small_config(steps=12), progress=False)
    student = tiny_model(n_kv_heads=1, seed=2)
    val = ids[:400]
    before = kl_to_teacher(student, teacher, val, seq_len=16)
    res = train(
        student, ids, tmp_path / "student", small_config(steps=12, distill_alpha=1.0), teacher=teacher, progress=False
    )
    after = kl_to_teacher(student, teacher, val, seq_len=16)
    assert after < 0.5 * before
    assert res.history[-1]["kl"] is not None and res.history[-1]["loss"] == pytest.approx(res.history[-1]["kl"])
    # A student identical to its teacher starts at zero KL.
    twin = copy.deepcopy(teacher)
    r = train(twin, ids, tmp_path / "twin", small_config(steps=1, distill_alpha=1.0), teacher=teacher, progress=False)
    assert abs(r.history[0]["kl"]) < 1e-5


def test_uptrain_budget_and_fraction():
    assert uptrain_tokens(tokens=500) == 500
    assert uptrain_tokens(fraction=0.05, pretrain_tokens=10_000) == 500
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            uptrain_tokens(fraction=bad, pretrain_tokens=10_000)
    with pytest.raises(ValueError, match="exactly one"):
        uptrain_tokens(tokens=5, fraction=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        uptrain_tokens()
    with pytest.raises(ValueError, match="--pretrain-tokens"):
        uptrain_tokens(fraction=0.1)


def test_uptrain_runs_for_the_budget(tmp_path):
    res = uptrain(tiny_model(), learnable_ids(), tmp_path / "u", tokens=300, seq_len=16, batch_size=4, progress=False)
    assert res.steps == 5 and res.tokens == 320  # 300 tokens round up to 5 steps of 64
    summary = json.loads((tmp_path / "u" / SUMMARY_NAME).read_text())
    assert summary["kind"] == "uptrain" and summary["requested_tokens"] == 300
    assert summary["train_config"]["warmup_steps"] == 1


def test_uptrain_defaults_are_the_measured_best_distillation_with_a_teacher(tmp_path):
    """With a teacher, uptrain (and gqa uptrain) defaults to pure KL, attention parameters, lr 1e-3, batches
    of 4; without one to the paper's LM uptraining of every parameter; a setting given explicitly wins."""
    def config(out, **kw):
        uptrain(tiny_model(n_kv_heads=2), learnable_ids(), tmp_path / out, tokens=64, seq_len=16, progress=False, **kw)
        return json.loads((tmp_path / out / SUMMARY_NAME).read_text())["train_config"]

    got = config("d", teacher=tiny_model(seed=3))
    assert (got["train_params"], got["distill_alpha"], got["lr"], got["batch_size"]) == ("attention", 1.0, 1e-3, 4)
    got = config("lm")
    assert (got["train_params"], got["lr"], got["batch_size"]) == ("all", 5e-4, 16)
    got = config("x", teacher=tiny_model(seed=3), lr=2e-4, train_params="kv")
    assert (got["train_params"], got["lr"], got["batch_size"]) == ("kv", 2e-4, 4)


def test_bad_input(tmp_path):
    ids = learnable_ids()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(tiny_model(), ids[:10], tmp_path / "a", small_config(), progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(GQAUserError, match="exists"):
        train(tiny_model(), ids, tmp_path / "exists", small_config(), progress=False)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    with pytest.raises(GQAUserError, match="nothing to resume; drop --resume"):
        train(tiny_model(), ids, tmp_path / "new", small_config(), resume=True, progress=False)
    other = GQAForCausalLM(GQAConfig(vocab_size=VOCAB + 1, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64))
    with pytest.raises(ValueError, match="teacher vocabulary"):
        train(tiny_model(), ids, tmp_path / "b", small_config(), teacher=other, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        train(tiny_model(), ids + VOCAB, tmp_path / "c", small_config(), progress=False)


def test_bf16_autocast_tracks_fp32(tmp_path):
    """bf16 autocast (the GPU default) on CPU: same first-step loss as fp32 within bf16 rounding."""
    ids = learnable_ids()
    fp32 = train(tiny_model(), ids, tmp_path / "fp32", small_config(steps=2, autocast="none"), progress=False)
    bf16 = train(tiny_model(), ids, tmp_path / "bf16", small_config(steps=2, autocast="bf16"), progress=False)
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=2e-2)
    assert bf16.history[0]["loss"] != fp32.history[0]["loss"]  # autocast really ran in bf16


def test_checkpoint_of_an_unfinished_run_can_be_evaluated(tmp_path):
    from gqa.evaluate import load_model, perplexity

    ids = learnable_ids()
    model = tiny_model()
    with pytest.raises(Killed):
        train(
            model,
            ids,
            tmp_path / "run",
            small_config(steps=4, checkpoint_every=2),
            progress=False,
            on_step_end=_kill_at(2),
        )
    loaded = load_model(tmp_path / "run")  # the folder of an unfinished run: its checkpoint.pt
    assert perplexity(loaded, ids[:200], seq_len=16).nll == pytest.approx(perplexity(model, ids[:200], seq_len=16).nll)
