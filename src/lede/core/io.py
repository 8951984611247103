"""Atomic file output: a crash or a kill mid-write leaves the previous file (or none), never half of one.

    from lede.core.io import atomic_path, atomic_write_csv, atomic_write_text
    atomic_write_text("results/x.md", text)
    atomic_write_csv("results/x.csv", [{"a": 1, "b": 2}, {"a": 3}])   # header a,b; missing and None cells empty
    with atomic_path("results/x.parquet") as tmp:   # write tmp however you like; renamed on success
        frame.to_parquet(tmp)
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ArtefactError", "atomic_path", "atomic_write_csv", "atomic_write_text", "load_artefact", "safe_torch_load"]


class ArtefactError(ValueError):
    """A file the project reads back is missing, truncated, or not what it claims to be."""


def safe_torch_load(path: str | os.PathLike, error: type[Exception] = ArtefactError, what: str = "file",
                    map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain data only, never code. A file that is not such a
    ``torch.save`` file (truncated, garbage, a pickle with code) raises ``error`` naming the path."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError,
            ValueError, TypeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path} is not a readable {what} (truncated, corrupt, or holding more than tensors and "
                    f"plain data: {first[:160]}): regenerate it") from None


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (same directory, so the rename is atomic on POSIX; a unique name,
    so concurrent writers of one output never share a temporary file), renamed onto ``path`` when the block
    ends without an exception and removed when it raises. The file is fsynced before the rename and the
    directory after it: once the block returns, the new file survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename
    try:
        yield tmp
        if tmp.exists():
            _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:  # e.g. a directory that cannot be opened on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str] | None = None) -> None:
    """``rows`` as CSV under the header ``fields`` (default: every key, in order of first appearance); keys
    outside ``fields`` are dropped, missing and None cells written empty."""
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r[k]) for k in fields} for r in rows)


def load_artefact(path: str | os.PathLike, fmt: str, error: type[Exception], what: str, fix: str) -> dict:
    """A ``torch.save``d dict whose ``format`` is ``fmt`` (tensors and plain data only: ``weights_only``), or
    ``error`` naming the path and ``fix`` when it is missing, and the path and ``fmt`` when it is something else."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found at {path}: {fix}")
    blob = safe_torch_load(path, error, what)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise error(f"{path} is not a lede artefact of format {fmt} ({what})")
    return blob
