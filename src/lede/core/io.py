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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_csv", "atomic_write_text", "load_artefact"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same directory, so the rename is atomic on POSIX), renamed onto
    ``path`` when the block ends without an exception and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise error(f"{path} is not a lede artefact of format {fmt} ({what})")
    return blob
