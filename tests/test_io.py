"""Atomic output (lede.core.io): a write that fails leaves the previous file untouched and no temporary behind."""

from __future__ import annotations

import csv

import pytest
import torch

from lede.drafters.distill import atomic_torch_save
from lede.core.exits import ADAPTER_FORMAT, AdapterError, load_adapter
from lede.core.io import atomic_path, atomic_write_csv, atomic_write_text, load_artefact


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "sub" / "out.md"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["out.md"]


def test_a_failed_torch_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "blob.pt"
    atomic_torch_save(path, {"x": 1})
    with pytest.raises(Exception):
        atomic_torch_save(path, {"x": lambda: 0})  # not picklable
    assert torch.load(path, weights_only=True) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["blob.pt"]


def test_csv_header_and_empty_cells(tmp_path):
    path = tmp_path / "t.csv"
    atomic_write_csv(path, [{"a": 1, "b": None}, {"a": 2, "c": "x"}])
    assert list(csv.reader(path.open())) == [["a", "b", "c"], ["1", "", ""], ["2", "", "x"]]
    atomic_write_csv(path, [{"a": 1, "b": 2}], fields=["b"])  # keys outside the header are dropped
    assert path.read_text().split() == ["b", "2"]


def test_artefacts_are_checked_before_use(tmp_path):
    """A missing artefact names the fix; a file of another kind (here an early-exit artefact given as an exit
    adapter) is refused, never half-loaded."""
    with pytest.raises(AdapterError, match="exit adapter not found at .*missing.pt: train it first"):
        load_adapter(tmp_path / "missing.pt", "m", 1, 8)
    other = tmp_path / "ee.pt"
    atomic_torch_save(other, {"format": "lede-early-exit/1", "deltas": {}})
    with pytest.raises(AdapterError, match=f"is not a lede artefact of format {ADAPTER_FORMAT} \\(exit adapter\\)"):
        load_adapter(other, "m", 1, 8)
    assert load_artefact(other, "lede-early-exit/1", ValueError, "x", "y")["deltas"] == {}


def test_concurrent_writers_use_their_own_temporary_files(tmp_path):
    import threading

    path = tmp_path / "out.txt"
    seen, errors = [], []
    barrier = threading.Barrier(8)

    def writer(i):
        try:
            with atomic_path(path) as tmp:
                seen.append(tmp)
                barrier.wait(timeout=10)  # all eight hold their temporary file at once
                tmp.write_text(str(i) * 10000)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(seen)) == 8
    text = path.read_text()
    assert len(text) == 10000 and len(set(text)) == 1  # one writer's whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert (path.stat().st_mode & 0o777) != 0o600  # the umask's mode, not mkstemp's


def test_fsync_of_file_and_directory(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced[-1] == str(tmp_path) and synced[0].startswith(str(tmp_path / ".a.txt."))


def test_a_crafted_pickle_is_refused_with_the_projects_error(tmp_path):
    import pickle

    from lede.core.io import ArtefactError, safe_torch_load
    from lede.rl.offline import PolicyError, RLPolicy

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "policy.pt"
    torch.save({"format": "x", "payload": Evil()}, evil)  # torch.save pickles the object
    assert not marker.exists() or marker.unlink() is None
    with pytest.raises(PolicyError, match=str(evil)):
        RLPolicy.load(evil)
    with pytest.raises(ArtefactError, match="policy.pt"):
        safe_torch_load(evil)
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    truncated = tmp_path / "trunc.pt"
    torch.save({"x": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for bad in (garbage, truncated):
        with pytest.raises(PolicyError, match=bad.name):
            RLPolicy.load(bad)
    with pytest.raises(PolicyError, match="not found"):
        RLPolicy.load(tmp_path / "missing.pt")
