"""gqa.progress: plain periodic lines (no carriage returns) off a terminal, a bar on one, silence when
disabled, and quiet third-party loading."""

from __future__ import annotations

import io

import torch

from gqa.progress import end_line, progress, quiet_loading


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("GQA_PROGRESS_INTERVAL", "0")  # a line on every update
    out = io.StringIO()
    with progress(total=4, desc="eval", unit="tok", file=out) as bar:
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss=1.23456)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("eval: 25% (1/4 tok)")
    assert lines[-1].startswith("eval: 100% (4/4 tok)") and lines[-1].endswith("loss=1.235, done")
    assert len(lines) == 5  # four updates and the final line


def test_plain_lines_are_periodic(monkeypatch):
    monkeypatch.setenv("GQA_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    items = list(progress(range(1000), desc="reduce", file=out))
    assert items == list(range(1000))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the final line
    assert "1000/1000" in out.getvalue()


def test_disabled_prints_nothing(monkeypatch):
    out = io.StringIO()
    with progress(total=3, desc="x", enabled=False, file=out) as bar:
        bar.update(3)
    monkeypatch.setenv("GQA_PROGRESS", "0")
    assert list(progress([1, 2], desc="y", file=out)) == [1, 2]
    assert out.getvalue() == ""


def test_terminal_bar_and_end_line():
    term = _Terminal()
    bar = progress(total=10, desc="convert", file=term)
    bar.update(5)
    assert "convert" in term.getvalue() and "\r" in term.getvalue()  # a live tqdm bar
    end_line()  # an error is about to be printed: the bar is closed, the cursor on a fresh line
    assert term.getvalue().endswith("\n")
    bar.update(1)  # updates after close are ignored, not errors
    bar.close()


def test_quiet_loading_silences_transformers_and_restores(tmp_path, capfd):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from gqa.formats.gguf import export_gguf
    from gqa.model import GQAConfig, GQAForCausalLM

    model = GQAForCausalLM(GQAConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48))
    export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    capfd.readouterr()
    with quiet_loading():
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "Loading weights" not in err, err
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_announce_loading_speaks_only_for_slow_loads(capsys, monkeypatch, tmp_path):
    """A GGUF source is dequantized for a minute or more: the commands say so instead of staying silent;
    a quick load (or a bad file refused at once) says nothing, so a refusal stays one line."""
    import time

    from gqa.progress import announce_loading

    monkeypatch.setenv("GQA_PROGRESS", "1")
    with announce_loading(tmp_path / "m.gguf", after_s=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "loading model m.gguf (dequantizing a GGUF)..." and err[1].startswith("loaded m.gguf in ")
    with announce_loading(tmp_path / "m.gguf", after_s=5):
        pass
    monkeypatch.setenv("GQA_PROGRESS", "0")
    with announce_loading(tmp_path / "m.gguf", after_s=0.05):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""
