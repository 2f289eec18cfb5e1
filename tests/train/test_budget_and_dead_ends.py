"""gqa.train: time budgets, which parameters move, keeping the best evaluation, and the run-folder dead ends
(killed before the first checkpoint, a torn metrics line, a live run's lock, stale temporary files)."""

from __future__ import annotations

import json

import pytest
import torch

from gqa import GQAConfig, GQAForCausalLM, load_hf
from gqa.errors import GQAUserError
from gqa.train import CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME, TrainConfig, train, uptrain
from gqa.train.loop import RUN_MARKER, _acquire_lock, _release_lock, check_not_inside, check_out_dir

VOCAB = 64


def tiny_model(n_kv_heads: int = 2, seed: int = 0) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, max_seq_len=64
    )
    return GQAForCausalLM(cfg)


def ids(n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (11,), generator=g)
    return motif.repeat(n // 11 + 1)[:n].clone()


def config(**kw) -> TrainConfig:
    base = dict(steps=6, seq_len=16, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, eval_tokens=200)
    return TrainConfig(**{**base, **kw})


class Killed(Exception):
    pass


def kill_at(step_to_die: int):
    def hook(step, _record):
        if step == step_to_die:
            raise Killed

    return hook


def test_time_budget_stops_cleanly_with_everything_written(tmp_path):
    budget_min = 0.02  # 1.2 s of training
    res = uptrain(tiny_model(), ids(), tmp_path / "u", max_minutes=budget_min, seq_len=16, batch_size=4, progress=False)
    out = tmp_path / "u"
    summary = json.loads((out / SUMMARY_NAME).read_text())
    records = [json.loads(x) for x in (out / METRICS_NAME).read_text().splitlines()]
    assert res.stopped_by_time and summary["stopped_by_time"] and summary["max_minutes"] == budget_min
    assert res.steps == summary["steps"] == len(records) >= 1
    assert records[-1]["train_seconds"] >= budget_min * 60  # it stopped because the budget was used ...
    assert records[-2]["train_seconds"] < budget_min * 60 if len(records) > 1 else True  # ... not before
    assert (out / "model.safetensors").is_file() and not (out / CHECKPOINT_NAME).exists()
    assert not (out / RUN_MARKER).exists()
    # the learning rate followed the clock down to the floor region
    assert records[-1]["lr"] < records[0]["lr"] or len(records) == 1
    with pytest.raises(GQAUserError, match="--max-minutes"):
        uptrain(tiny_model(), ids(), tmp_path / "v", max_minutes=-1, seq_len=16, batch_size=4, progress=False)
    with pytest.raises(GQAUserError, match="--train must be one of"):
        TrainConfig(train_params="mlp")


def test_time_fraction_drives_the_cosine():
    cfg = TrainConfig(steps=10**9, lr=1.0, warmup_steps=0, min_lr_ratio=0.0, max_minutes=1.0)
    assert cfg.lr_at(5, 0.0) == pytest.approx(1.0)
    assert cfg.lr_at(5, 0.5) == pytest.approx(0.5)
    assert cfg.lr_at(5, 1.0) == pytest.approx(0.0)


@pytest.mark.parametrize("which", ["kv", "attention"])
def test_train_params_moves_only_those(tmp_path, which):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, ids(), tmp_path / which, config(steps=2, train_params=which), progress=False)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    if which == "kv":
        allowed = {k for k in before if ".attn.k_proj." in k or ".attn.v_proj." in k}
    else:
        allowed = {k for k in before if ".attn." in k}
    assert moved and moved <= allowed
    assert all(p.requires_grad for p in model.parameters())  # flags restored for the caller


def test_keep_best_saves_the_best_evaluated_weights(tmp_path):
    model = tiny_model()
    kept = {}

    def hook(step, _record):
        if step == 2:  # evaluated at step 2 (eval_every=2): remember those weights
            kept.update({k: v.clone() for k, v in model.state_dict().items()})
        if step == 3:  # then wreck the model: later weights evaluate far worse
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 5)

    res = train(
        model, ids(), tmp_path / "b", config(steps=4, eval_every=2, lr=1e-3), val_ids=ids(400, 1),
        progress=False, on_step_end=hook,
    )  # fmt: skip
    assert res.best_step == 2
    assert json.loads((tmp_path / "b" / SUMMARY_NAME).read_text())["kept_step"] == 2
    saved = load_hf(tmp_path / "b").state_dict()
    for k, v in kept.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


def test_killed_before_the_first_checkpoint_resumes_from_step_zero(tmp_path):
    full = train(tiny_model(), ids(), tmp_path / "full", config(checkpoint_every=5), progress=False)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_model(), ids(), out, config(checkpoint_every=5), progress=False, on_step_end=kill_at(2))
    assert not (out / CHECKPOINT_NAME).exists() and (out / RUN_MARKER).exists()
    with pytest.raises(GQAUserError, match="unfinished run; pass --resume"):
        check_out_dir(out, resume=False)
    res = train(tiny_model(), ids(), out, config(checkpoint_every=5), resume=True, progress=False)
    assert res.final_loss == full.final_loss
    steps = [json.loads(x)["step"] for x in (out / METRICS_NAME).read_text().splitlines()]
    assert steps == list(range(1, 7))
    with pytest.raises(GQAUserError, match="no unfinished run to resume"):  # finished: nothing to resume
        check_out_dir(out, resume=True)


def test_torn_metrics_line_and_stale_checkpoint_temp_do_not_block_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_model(), ids(), out, config(), progress=False, on_step_end=kill_at(3))
    with (out / METRICS_NAME).open("a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed mid-write: no closing brace, no newline
    (out / f".{CHECKPOINT_NAME}.tmp-abc123").write_bytes(b"half a checkpoint")  # killed mid-checkpoint
    train(tiny_model(), ids(), out, config(), resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (out / METRICS_NAME).read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert not list(out.glob(f".{CHECKPOINT_NAME}*")) and not (out / RUN_MARKER).exists()


def test_a_live_run_locks_its_out(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_model(), ids(), out, config(), progress=False, on_step_end=kill_at(3))
    fd = _acquire_lock(out)  # stands for a live process training into OUT
    try:
        with pytest.raises(GQAUserError, match="training into"):
            check_out_dir(out, resume=True)
        with pytest.raises(GQAUserError, match="training into"):
            train(tiny_model(), ids(), out, config(), resume=True, progress=False)
    finally:
        _release_lock(fd, out, finished=False)
    train(tiny_model(), ids(), out, config(), resume=True, progress=False)  # once it is gone, resume works


def test_out_inside_a_source_is_refused(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(GQAUserError, match="overlaps MODEL"):
            check_not_inside(out, {"MODEL": src})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    check_not_inside(tmp_path / "out", {"MODEL": gguf})  # beside a model file is fine
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_NAME).write_bytes(b"x")
    with pytest.raises(GQAUserError, match="overlaps"):
        check_not_inside(run / "sub", {"MODEL": run / CHECKPOINT_NAME})
