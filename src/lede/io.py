"""Atomic file output: a crash or a kill mid-write leaves the previous file (or none), never half of one.

    from lede.io import atomic_path, atomic_write_text
    atomic_write_text("results/x.md", text)
    with atomic_path("results/x.parquet") as tmp:   # write tmp however you like; renamed on success
        frame.to_parquet(tmp)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text"]


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
