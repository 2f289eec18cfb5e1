"""Reading model files safely: the one reader of JSON objects (``config.json``, index files), and the one check that a file name a folder lists (an index's shard, a side file) is a bare name inside that folder.

Model folders are data from anywhere: a name such as ``../x``, an absolute path or a symlink leading out
must never make gqa read, or write, a file elsewhere. A Hugging Face hub cache snapshot is the one
layout whose links lead out, and only into its own repository's ``blobs/``: those load, nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from gqa.errors import GQAUserError, first_line

__all__ = ["read_json_object", "safe_member", "hub_blobs"]


def read_json_object(
    path: str | Path, *, fix: str = "restore the model's config.json", missing: str | None = None
) -> dict:
    """The JSON object in ``path`` (a ``config.json``, an index file): the one reader of such files.

    A missing or unreadable file, text that is not JSON, or JSON that is not an object is a one-line
    :class:`GQAUserError` ending in ``fix`` (``missing``, when given, replaces it for a missing file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GQAUserError(f"{path} does not exist; {missing or fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GQAUserError(f"{path} is not valid JSON ({first_line(e)}); {fix}") from None
    except OSError as e:
        raise GQAUserError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    if not isinstance(data, dict):
        raise GQAUserError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def hub_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of the Hugging Face hub cache repository whose snapshot ``folder`` is, else None.

    The hub cache keeps each file once, in ``models--org--name/blobs/``; a snapshot
    (``models--org--name/snapshots/<revision>/``) holds only links into it.
    """
    real = Path(folder).resolve()
    snapshots, repo = real.parent, real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--"):
        return repo / "blobs"
    return None


def safe_member(folder: Path, name, what: str) -> Path:
    """``folder / name`` for a bare file name that stays inside ``folder`` (symlinks resolved), else a
    one-line error. Names come from files a model folder ships (the safetensors index), so they are
    never trusted: no ``..``, no absolute path, no sub-folder, no symlink leading out. The one exception
    is a hub cache snapshot, whose files are links into the same repository's ``blobs/`` (:func:`hub_blobs`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise GQAUserError(
            f"{what} names {name!r}, which is not a bare file name inside the model folder {folder}; re-save the checkpoint"
        )
    path = folder / name
    real = path.resolve()
    blobs = hub_blobs(folder)
    if not (real.is_relative_to(folder.resolve()) or (blobs is not None and real.parent == blobs)):
        raise GQAUserError(
            f"{what} {name!r} is a link to {real}, outside the model folder {folder}; copy the real file into it first"
        )
    return path
