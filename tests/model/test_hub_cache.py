"""Hugging Face hub cache snapshots load (issue 26): every file of ``models--x/snapshots/<rev>/`` is a link into
``models--x/blobs/``, which the traversal check used to refuse. Links into that repository's own ``blobs/``
are followed; a link anywhere else (another folder, another repository's blobs, blobs of a folder that is
not a snapshot) stays refused."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gqa.cli import app
from gqa.errors import GQAUserError
from gqa.model.assets import shipped_model_path
from gqa.model.files import hub_blobs, safe_member
from gqa.model.loading import load_model
from helpers import digest

TEXT = "KING HENRY:\nOnce more unto the breach, dear friends, once more;\n" * 8
runner = CliRunner()


def hub_snapshot(model_folder: Path, hub: Path, repo: str = "models--org--tiny", rev: str = "0123abcd") -> Path:
    """Lay ``model_folder`` out as huggingface_hub caches it: files in ``blobs/<sha256>``, the snapshot made of
    relative links ``../../blobs/<sha256>``, ``refs/main`` naming the revision."""
    root = hub / repo
    blobs, snap = root / "blobs", root / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    for f in sorted(model_folder.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy2(f, blobs / sha)
        os.symlink(f"../../blobs/{sha}", snap / f.name)
    return snap


@pytest.fixture
def snapshot(tmp_path) -> Path:
    """The shipped model (with its tokenizer) as a hub cache snapshot."""
    return hub_snapshot(shipped_model_path(), tmp_path / "hub")


def test_snapshot_loads_with_the_same_weights(snapshot, tmp_path):
    assert hub_blobs(snapshot) == (tmp_path / "hub" / "models--org--tiny" / "blobs").resolve()
    assert all(p.is_symlink() for p in snapshot.iterdir())
    model, want = load_model(snapshot), load_model(shipped_model_path())
    ids = torch.tensor([[3, 17, 5, 60, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want(ids), rtol=0, atol=0)


def test_eval_and_convert_read_a_snapshot(snapshot, tmp_path):
    """The real commands: gqa eval and gqa convert (streaming) on a snapshot, which stays unchanged."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    before = digest(tmp_path / "hub")
    r = runner.invoke(app, ["eval", str(snapshot), "--data", str(text), "--max-tokens", "64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["convert", str(snapshot), str(tmp_path / "out"), "--kv-heads", "1"])
    assert r.exit_code == 0, r.output
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())  # OUT holds real files
    assert load_model(tmp_path / "out").config.kv_heads_per_layer == [1] * 4
    assert digest(tmp_path / "hub") == before


def _relink(snapshot: Path, name: str, target: Path | str) -> None:
    (snapshot / name).unlink()
    os.symlink(target, snapshot / name)


@pytest.mark.parametrize("where", ["outside", "other_repo_blobs", "snapshot_of_other_repo"])
def test_links_out_of_the_repository_stay_refused(snapshot, tmp_path, where):
    real = (snapshot / "model.safetensors").resolve()
    if where == "outside":
        target = tmp_path / "elsewhere" / "model.safetensors"
    elif where == "other_repo_blobs":
        target = tmp_path / "hub" / "models--evil--x" / "blobs" / real.name
    else:  # another repository's snapshot folder, not its blobs
        target = tmp_path / "hub" / "models--evil--x" / "snapshots" / "r" / "model.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy2(real, target)
    _relink(snapshot, "model.safetensors", target)
    with pytest.raises(GQAUserError, match="outside the model folder"):
        load_model(snapshot)
    r = runner.invoke(app, ["convert", str(snapshot), str(tmp_path / "out"), "--kv-heads", "1"])
    assert r.exit_code == 2 and "outside the model folder" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_blobs_beside_a_plain_folder_are_not_a_hub_cache(tmp_path):
    """Only a folder that is a snapshot (``models--*/snapshots/<rev>``) may link into ``../../blobs``."""
    folder = tmp_path / "models--x" / "notsnapshots" / "rev"
    folder.mkdir(parents=True)
    (tmp_path / "models--x" / "blobs").mkdir()
    (tmp_path / "models--x" / "blobs" / "abc").write_bytes(b"x")
    os.symlink("../../blobs/abc", folder / "model.safetensors")
    assert hub_blobs(folder) is None
    with pytest.raises(GQAUserError, match="outside the model folder"):
        safe_member(folder, "model.safetensors", "safetensors file")


def test_a_blob_linking_out_is_refused(snapshot, tmp_path):
    """Links are resolved to the end: a blob that is itself a link out of the cache is refused."""
    blob = (snapshot / "config.json").resolve()
    outside = tmp_path / "outside.json"
    shutil.copy2(blob, outside)
    blob.unlink()
    os.symlink(outside, blob)
    with pytest.raises(GQAUserError, match="outside the model folder"):
        safe_member(snapshot, "config.json", "config.json")
