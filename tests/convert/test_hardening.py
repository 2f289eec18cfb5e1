"""`gqa convert` against hostile or broken input: file names from the index, symlinks, corrupt safetensors
headers, pickle-only folders, absurd options, another filesystem, SIGTERM, --force on the wrong folder.

Every refusal: exit code 2, one stderr line, nothing left beside OUT, the source's bytes unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gqa.cli import app
from helpers import build, logits, save

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny llama (8 query heads, 4 KV heads) in one safetensors file, plus a tokenizer side file."""
    folder = tmp_path_factory.mktemp("pristine") / "m"
    save(build("llama", n_kv=4), folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture
def work(pristine, tmp_path):
    """tmp_path/work/m: a private copy of the source; OUT goes to tmp_path/work/out."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(pristine, root / "m")
    return root


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def refused(root: Path, args: list[str], needle: str, keep: tuple[str, ...] = ("m",)) -> str:
    """Run the CLI; assert exit 2, one stderr line containing ``needle``, no leftovers, SRC unchanged."""
    src = root / "m"
    before = digest(src)
    outside = {p: digest(p) for p in root.parent.iterdir() if p != root}
    r = runner.invoke(app, ["convert", *args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert sorted(p.name for p in root.iterdir()) == sorted(keep), sorted(p.name for p in root.iterdir())
    assert digest(src) == before, "the source was modified"
    assert {p: digest(p) for p in root.parent.iterdir() if p != root} == outside, "a file outside OUT changed"
    return lines[0]


def convert_args(root: Path, *extra: str) -> list[str]:
    return [str(root / "m"), str(root / "out"), "--kv-heads", "2", *extra]


# ---- issue 12 item 1: the index's file names are never trusted ------------------------------------


def _index(root: Path, target: str) -> None:
    """Write an index mapping every tensor of m/model.safetensors to ``target``."""
    from safetensors import safe_open

    with safe_open(str(root / "m" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, target)}
    (root / "m" / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "target",
    ["../m/model.safetensors", "{root}/m/model.safetensors", "sub/model.safetensors", "..", ".", "a\\b.safetensors"],
    ids=["dotdot", "absolute", "subfolder", "parent", "self", "backslash"],
)
def test_index_names_outside_src_are_refused(work, target):
    sub = work / "m" / "sub"
    sub.mkdir()
    shutil.copy(work / "m" / "model.safetensors", sub / "model.safetensors")
    _index(work, target.format(root=work))
    refused(work, convert_args(work), "not a bare file name inside the model folder")
    refused(work, convert_args(work, "--calib", str(work / "m" / "config.json")), "not a bare file name inside the model folder")


def test_index_pointing_at_its_own_shard_with_dotdot_cannot_truncate_src(work):
    """The audit's reproduction: every tensor mapped to ../m/model.safetensors truncated the source to 4 KB."""
    size = (work / "m" / "model.safetensors").stat().st_size
    _index(work, "../m/model.safetensors")
    refused(work, [str(work / "m"), str(work / "m-gqa2"), "--kv-heads", "2"], "not a bare file name")
    assert (work / "m" / "model.safetensors").stat().st_size == size


@pytest.mark.parametrize("indexed", [True, False])
def test_symlinked_shard_leading_out_of_src_is_refused(work, indexed):
    elsewhere = work.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.move(work / "m" / "model.safetensors", elsewhere / "model.safetensors")
    (work / "m" / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    if indexed:
        _index(work, "model.safetensors")
    refused(work, convert_args(work), "outside the model folder")


def test_symlinked_side_file_leading_out_of_src_is_refused(work):
    secret = work.parent / "secret.txt"
    secret.write_text("not yours")
    (work / "m" / "tokenizer.json").symlink_to(secret)
    refused(work, convert_args(work), "outside the model folder")


# ---- issue 12 item 3 (convert side): code in a model folder is never copied -------------------------


def test_python_files_and_auto_map_are_not_copied(work):
    (work / "m" / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (work / "m" / "configuration_evil.py").write_text("raise SystemExit('ran')\n")
    cfg = json.loads((work / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (work / "m" / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", *convert_args(work)])
    assert r.exit_code == 0, r.output
    out = work / "out"
    assert not list(out.glob("*.py"))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer_config.json").is_file()


# ---- issue 12 item 5 / 8: corrupt safetensors headers -------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header dict)`` to a safetensors file's JSON header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _two_tensors(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


HEADER_CASES = {
    "negative-dim": (lambda h: h[_first_tensor(h)].update(shape=[-4, -8]), "non-negative"),
    "float-dim": (lambda h: h[_first_tensor(h)].update(shape=[2.5]), "non-negative"),
    "entry-not-object": (lambda h: h.update({_first_tensor(h): [1, 2, 3]}), "not an object"),
    "unknown-dtype": (lambda h: h[_first_tensor(h)].update(dtype="F8_E4M3"), "has dtype 'F8_E4M3'"),
    "no-dtype": (lambda h: h[_first_tensor(h)].pop("dtype"), "has dtype None"),
    "negative-offset": (lambda h: h[_first_tensor(h)].update(data_offsets=[-8, 0]), "data_offsets"),
    "reversed-offsets": (lambda h: h[_first_tensor(h)].update(data_offsets=[64, 0]), "data_offsets"),
    "out-of-range": (lambda h: h[_first_tensor(h)].update(data_offsets=[2**40, 2**40 + 8], shape=[2]), "ends at"),
    "size-mismatch": (lambda h: h[_first_tensor(h)].update(shape=[1]), "bytes for shape"),
    "overlap": (
        lambda h: h[_two_tensors(h)[1]].update(
            data_offsets=h[_two_tensors(h)[0]]["data_offsets"],
            shape=h[_two_tensors(h)[0]]["shape"],
            dtype=h[_two_tensors(h)[0]]["dtype"],
        ),
        "overlap",
    ),
    "metadata-not-object": (lambda h: h.update(__metadata__=[1]), "__metadata__"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_corrupt_headers_are_one_line_errors(work, case):
    edit, needle = HEADER_CASES[case]
    _rewrite_header(work / "m" / "model.safetensors", edit)
    refused(work, convert_args(work), needle)


# ---- issue 12 item 8: pickles, absurd numbers, OUT = . -------------------------------------------------


def test_pickle_only_folder_is_refused(work):
    (work / "m" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, work / "m" / "pytorch_model.bin")
    line = refused(work, convert_args(work), "reads only safetensors folders and GGUF files")
    assert "pytorch_model.bin" in line


@pytest.mark.parametrize("budget", ["inf", "nan", "-1", "0"])
def test_absurd_budgets_are_refused(work, budget):
    refused(work, [str(work / "m"), str(work / "out"), "--kv-budget", budget, "--calib", "x"], "--kv-budget")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("num_attention_heads", 0, "num_attention_heads=0"),
        ("num_key_value_heads", 0, "num_key_value_heads=0"),
        ("num_key_value_heads", -8, "num_key_value_heads=-8"),
        ("num_hidden_layers", 1e9, "from 1 to"),
        ("num_attention_heads", 10**12, "from 1 to"),
        ("num_hidden_layers", 3, "holds 2 layers"),
        ("hidden_size", "wide", "hidden_size='wide'"),
    ],
)
def test_bad_config_numbers_are_refused(work, key, value, needle):
    cfg = json.loads((work / "m" / "config.json").read_text())
    (work / "m" / "config.json").write_text(json.dumps(cfg | {key: value}))
    refused(work, convert_args(work), needle)


def test_config_that_is_a_list_is_refused(work):
    (work / "m" / "config.json").write_text("[1, 2]")
    refused(work, convert_args(work), "not an object")


def test_out_dot_with_force_is_refused(work, monkeypatch):
    out = work / "prev"
    out.mkdir()
    (out / "config.json").write_text("{}")  # even an earlier output: it is the working directory
    monkeypatch.chdir(out)
    refused(work, [str(work / "m"), ".", "--kv-heads", "2", "--force"], "current directory", keep=("m", "prev"))
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_and_src_must_be_apart(work, where):
    out = {"same": work / "m", "inside": work / "m" / "sub", "contains": work}[where]
    refused(work, [str(work / "m"), str(out), "--kv-heads", "2", "--force"], "outside SRC")


def test_force_refuses_a_folder_that_is_not_an_earlier_output(work):
    out = work / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(work, convert_args(work, "--force"), "earlier model folder", keep=("m", "out"))
    assert (out / "notes.txt").read_text() == "mine"


# ---- issue 12 item 2: OUT on another filesystem -----------------------------------------------------


def test_copy_file_range_exdev_falls_back_to_a_plain_copy(work, monkeypatch):
    r = runner.invoke(app, ["convert", str(work / "m"), str(work / "same-fs"), "--kv-heads", "4"])
    assert r.exit_code == 0, r.output
    calls = []

    def cross_device(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    r = runner.invoke(app, ["convert", str(work / "m"), str(work / "other-fs"), "--kv-heads", "4"])
    assert r.exit_code == 0, r.output
    assert calls, "the test did not exercise copy_file_range"
    for name in ("model.safetensors", "config.json"):
        assert (work / "same-fs" / name).read_bytes() == (work / "other-fs" / name).read_bytes()
    assert torch.equal(logits(work / "other-fs"), logits(work / "m"))


# ---- issue 12 item 9: SIGTERM and stale partials -------------------------------------------------


SLOW_CONVERT = """
import sys, time
import gqa.convert.streaming as streaming
real = streaming.merge_heads
def slow(*args, **kwargs):
    time.sleep(0.5)
    return real(*args, **kwargs)
streaming.merge_heads = slow
from gqa.cli import main
sys.argv = ["gqa", "convert", *sys.argv[1:]]
main()
"""


def test_sigterm_removes_the_partial_folder(work):
    before = digest(work / "m")
    env = {**os.environ, "GQA_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(work / "m"), str(work / "out"), "--kv-heads", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not list(work.glob(".out.partial-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(work.glob(".out.partial-*")), "the conversion never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert sorted(p.name for p in work.iterdir()) == ["m"]
    assert digest(work / "m") == before


def test_stale_partials_of_killed_runs_are_cleaned(work):
    stale = work / ".out.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    r = runner.invoke(app, ["convert", *convert_args(work)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.iterdir()) == ["m", "out"]


# ---- issue 26 defect 2: one writer per OUT; the final rename replaces only what was checked ----------

GATED_CONVERT = """
import os, sys, time
from pathlib import Path
import gqa.convert.streaming as streaming
gate = Path(os.environ["GATE"])
real = streaming.merge_heads
def gated(*args, **kwargs):
    # the first merge waits (OUT's partial folder and lock exist by then) until the test opens the gate
    if not gate.exists():
        Path(str(gate) + ".waiting").touch()
        deadline = time.time() + 120
        while not gate.exists() and time.time() < deadline:
            time.sleep(0.02)
    return real(*args, **kwargs)
streaming.merge_heads = gated
from gqa.cli import main
sys.argv = ["gqa", "convert", *sys.argv[1:]]
main()
"""


def start_gated(root: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `gqa convert ARGS` in another process; it stops at its first merge until the gate is opened."""
    gate = root.parent / "gate"
    env = {**os.environ, "GQA_PROGRESS": "0", "GATE": str(gate)}
    proc = subprocess.Popen(
        [sys.executable, "-c", GATED_CONVERT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not Path(f"{gate}.waiting").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert Path(f"{gate}.waiting").exists(), proc.communicate(timeout=60)
    return proc, gate


def finish(proc: subprocess.Popen, gate: Path) -> tuple[int, str]:
    gate.touch()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def one_line(rc: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, (rc, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_a_second_run_into_the_same_out_is_refused_and_the_first_finishes(work):
    from helpers import assert_one_line_refusal, gqa_cli

    before = digest(work / "m")
    first, gate = start_gated(work, str(work / "m"), str(work / "out"), "--kv-heads", "2")
    partial = list(work.glob(".out.partial-*"))
    assert len(partial) == 1
    second = gqa_cli(["convert", work / "m", work / "out", "--kv-heads", "4"], work.parent, env={"GQA_PROGRESS": "0"})
    assert_one_line_refusal(second, f"another gqa run is writing {work / 'out'}; wait for it or choose another OUT")
    assert list(work.glob(".out.partial-*")) == partial, "the second run touched the first's partial folder"
    rc, err = finish(first, gate)
    assert rc == 0, err[-3000:]
    assert json.loads((work / "out" / "config.json").read_text())["num_key_value_heads"] == 2
    assert sorted(p.name for p in work.iterdir()) == ["m", "out"]
    assert digest(work / "m") == before


def test_a_lock_held_by_another_process_refuses_and_keeps_its_temporaries(work):
    import fcntl

    (work / ".out.partial-live01").mkdir()  # the live writer's folder: not stale while it holds the lock
    fd = os.open(work / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        refused(work, convert_args(work), "another gqa run is writing", keep=("m", ".out.lock", ".out.partial-live01"))
    finally:
        os.close(fd)


@pytest.mark.parametrize("theirs", [[], ["notes.txt"]], ids=["empty", "with-files"])
def test_an_out_that_appears_during_the_run_is_not_replaced(work, theirs):
    before = digest(work / "m")
    proc, gate = start_gated(work, str(work / "m"), str(work / "out"), "--kv-heads", "2")
    (work / "out").mkdir()  # another program creates OUT meanwhile (an empty folder a rename would replace)
    for name in theirs:
        (work / "out" / name).write_text("mine")
    one_line(*finish(proc, gate), "appeared while this run was writing it")
    assert sorted(p.name for p in (work / "out").iterdir()) == theirs
    assert sorted(p.name for p in work.iterdir()) == ["m", "out"]
    assert digest(work / "m") == before


def test_force_does_not_replace_an_out_swapped_during_the_run(work):
    r = runner.invoke(app, ["convert", *convert_args(work)])
    assert r.exit_code == 0, r.output
    proc, gate = start_gated(work, *convert_args(work, "--force"))
    os.rename(work / "out", work / "checked")  # the folder --force checked is moved away, another takes its place
    (work / "out").mkdir()
    (work / "out" / "conversion_report.json").write_text("{}")
    one_line(*finish(proc, gate), "was replaced by another program")
    assert [p.name for p in (work / "out").iterdir()] == ["conversion_report.json"]
    assert sorted(p.name for p in work.iterdir()) == ["checked", "m", "out"]


# ---- issue 26 defect 5: OUT's name is never a glob --------------------------------------------------

NEIGHBOURS = (".x.partial-abc", ".y.old-abc", ".z.tmp-abc", ".ab.partial-abc", ".ac.old-1", ".a.partial-1.lock")


def _convert_among_neighbours(work: Path, name: str) -> None:
    """Convert into p/NAME beside other targets' temporaries: only NAME's own stale one goes."""
    parent = work / "p"
    parent.mkdir()
    keep = [n for n in NEIGHBOURS if not n.startswith(f".{name}.")]
    for n in keep:
        (parent / n).mkdir()
    (parent / f".{name}.partial-k1ll3d").mkdir()  # a killed run's leftover of this very OUT
    before = digest(work / "m")
    r = runner.invoke(app, ["convert", str(work / "m"), str(parent / name), "--kv-heads", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(parent)) == sorted([*keep, name])
    assert (parent / name / "conversion_report.json").is_file()
    assert digest(work / "m") == before


@pytest.mark.parametrize("name", ["*", "a[bc]", "?", "[!q]*", "a*"])
def test_out_names_with_glob_characters_delete_only_their_own_leftovers(work, name):
    _convert_among_neighbours(work, name)


def test_out_names_are_matched_literally_property(pristine, tmp_path_factory):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    names = st.text(alphabet="abxyz*?[]!^-.", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))

    @settings(max_examples=25, deadline=None)
    @given(name=names)
    def check(name):
        root = tmp_path_factory.mktemp("work")
        shutil.copytree(pristine, root / "m")
        _convert_among_neighbours(root, name)

    check()


# ---- issue 26 defect 9: --force replaces only a folder gqa convert wrote ----------------------------


def test_force_with_swapped_arguments_keeps_the_original_model(work):
    """`gqa convert m-gqa m --force`: m has config.json and weights but no conversion report, so it stays."""
    r = runner.invoke(app, ["convert", str(work / "m"), str(work / "m-gqa"), "--kv-heads", "2"])
    assert r.exit_code == 0, r.output
    line = refused(
        work,
        [str(work / "m-gqa"), str(work / "m"), "--kv-heads", "1", "--force"],
        "--force replaces only an earlier model folder that gqa wrote (with conversion_report.json)",
        keep=("m", "m-gqa"),
    )
    assert "choose another OUT" in line  # refused() also checked that m's bytes are unchanged


def test_force_refuses_a_folder_saved_by_gqa_save_hf_without_a_report(work):
    from gqa.model import GQAConfig, GQAForCausalLM, save_hf

    model = GQAForCausalLM(GQAConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=8, n_kv_heads=4, ffn_dim=48))
    save_hf(model, work / "out")
    refused(work, convert_args(work, "--force"), "earlier model folder that gqa wrote", keep=("m", "out"))
    assert (work / "out" / "model.safetensors").is_file()


# ---- issue 26 defect 13: gqa's own output is loadable by gqa -----------------------------------------


def test_streaming_output_of_a_folder_with_model_code_runs_in_gqa_generate(tmp_path):
    """The tokenizer's auto_map (and config.json's) are dropped, *.py never copied: `gqa generate OUT` works."""
    from gqa.model.assets import shipped_model_path
    from helpers import gqa_cli

    src, out, marker = tmp_path / "m", tmp_path / "out", tmp_path / "code-ran"
    shutil.copytree(shipped_model_path(), src)
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name in ("configuration_evil.py", "tokenization_evil.py"):
        (src / name).write_text(code)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok |= {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "custom_pipelines": {}}
    (src / "tokenizer_config.json").write_text(json.dumps(tok))
    before = digest(src)
    res = gqa_cli(["convert", src, out, "--kv-heads", "4"], tmp_path, env={"GQA_PROGRESS": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written == {k: v for k, v in tok.items() if k not in ("auto_map", "custom_pipelines")}
    assert "auto_map" not in json.loads((out / "config.json").read_text()) and not list(out.glob("*.py"))
    res = gqa_cli(["generate", out, "-p", "ROMEO:", "--max-new-tokens", "4"], tmp_path, env={"GQA_PROGRESS": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not marker.exists() and digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
