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
