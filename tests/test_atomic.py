"""gqa.atomic: one writer per target (the lock), literal matching of temporaries, the final rename that never
replaces what was not checked, and the one rule for ``force`` (issue 26, defects 2, 5 and 9)."""

from __future__ import annotations

import fcntl
import os
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gqa.atomic import _rename_noreplace, atomic_dir, check_replaceable, clean_stale_partials, writer_lock
from gqa.errors import GQAUserError


def hold_lock(path: Path) -> int:
    """Take the writer lock on ``path`` the way another process would; returns the fd (close it to release)."""
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_writer_is_refused_in_one_line_and_the_lock_file_goes_away(tmp_path):
    out = tmp_path / "out"
    with writer_lock(out):
        with pytest.raises(GQAUserError, match=f"another gqa run is writing {out}; wait for it or choose another OUT"):
            with writer_lock(out):
                pass
    assert list(tmp_path.iterdir()) == []
    with writer_lock(out):  # free again
        pass


def test_a_lock_file_left_by_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / ".out.lock").write_text("")  # kill -9 leaves the file, but no process holds its lock
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_while_another_writer_holds_the_lock_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / ".out.partial-abc123"  # the live writer's folder
    live.mkdir()
    fd = hold_lock(out)
    try:
        with pytest.raises(GQAUserError, match="another gqa run is writing"), atomic_dir(out):
            pass
        assert clean_stale_partials(out) == []  # a live run's temporaries are not stale
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", ".out.partial-abc123"]
    assert clean_stale_partials(out) == [live]  # its writer is gone: now they are


def test_rename_noreplace_never_replaces_an_empty_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("new")
    (tmp_path / "b").mkdir()  # a plain rename would silently replace this
    assert _rename_noreplace(tmp_path / "a", tmp_path / "b") is False
    assert (tmp_path / "a" / "f").read_text() == "new" and list((tmp_path / "b").iterdir()) == []
    assert _rename_noreplace(tmp_path / "a", tmp_path / "c") is True
    assert (tmp_path / "c" / "f").read_text() == "new"


def test_a_folder_that_appears_during_the_build_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GQAUserError, match="appeared while this run was writing it"):
        with atomic_dir(out) as d:
            (d / "new").write_text("ours")
            out.mkdir()  # another program (not gqa) creates OUT meanwhile, empty
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_only_the_folder_it_checked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(GQAUserError, match="was replaced by another program"):
        with atomic_dir(out, force=True, marker="report.json") as d:
            (d / "new").write_text("ours")
            os.rename(out, tmp_path / "moved")  # swapped for another folder while the build runs
            out.mkdir()
            (out / "theirs").write_text("keep me")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved", "out"]


@pytest.mark.parametrize(
    "files, allowed",
    [([], True), (["report.json"], True), (["report.json", "x.bin"], True), (["config.json"], False), (["x"], False)],
)
def test_force_replaces_only_an_empty_folder_or_one_with_the_marker(tmp_path, files, allowed):
    out = tmp_path / "out"
    out.mkdir()
    for f in files:
        (out / f).write_text("")
    with pytest.raises(GQAUserError, match="exists; choose another path or pass --force"):
        check_replaceable(out, False, "report.json")
    if allowed:
        assert check_replaceable(out, True, "report.json") is not None
    else:
        with pytest.raises(GQAUserError, match="replaces only an earlier model folder that gqa wrote"):
            check_replaceable(out, True, "report.json")
    assert check_replaceable(out, True) is not None  # no marker: the caller decides (gqa.model's savers)


def test_force_never_replaces_a_link_or_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    (tmp_path / "link").symlink_to(tmp_path)
    for name in ("f", "link"):
        with pytest.raises(GQAUserError, match="is not a folder"):
            check_replaceable(tmp_path / name, True, "report.json")


# ---- defect 5: OUT's name is matched literally, never as a glob ------------------------------------

GLOBBY = st.text(alphabet="ab*?[]!^-." + string.digits, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
# Neighbours of other targets (and of nothing) that a glob built from OUT's name would have matched.
DECOYS = [
    ".x.partial-abc",
    ".ab.partial-abc",
    ".ac.old-abc",
    ".b.tmp-abc",
    ".a.tmp-1.json",
    ".[.partial-1",
    ".*.old-1",
    ".a.partial-1.lock",
    ".a.partial-1.partial-xyz",
    "plain",
]


@settings(max_examples=200, deadline=None)
@given(name=GLOBBY)
def test_clean_stale_partials_matches_its_own_names_literally(tmp_path_factory, name):
    parent = tmp_path_factory.mktemp("p")
    decoys = [d for d in DECOYS if not d.startswith(f".{name}.")]
    stale = [f".{name}.partial-k1ll3d", f".{name}.old-k1ll3d", f".{name}.tmp-k1ll3d"]
    for n in decoys + stale:
        (parent / n).mkdir()
    removed = clean_stale_partials(parent / name)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(os.listdir(parent)) == sorted(decoys)


def test_a_link_at_the_lock_name_is_refused_without_creating_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / ".out.lock").symlink_to(target)
    with pytest.raises(GQAUserError, match="is a link, not gqa's lock file"), atomic_dir(tmp_path / "out"):
        pass
    assert not target.exists() and not (tmp_path / "out").exists()
