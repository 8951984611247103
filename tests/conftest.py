"""Shared fixtures: tiny random models (cached per process) and the real SmolLM2 (integration only)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from lede.data import DEFAULT_DATA_DIR, SPEC_BENCH_FILE
from lede.testing import tiny_model

torch.set_num_threads(int(os.environ.get("LEDE_TEST_THREADS", "2")))
REPO = Path(__file__).resolve().parents[1]
# The real benchmark files, shipped in the repository (data/, the workflow's default data_dir): a clone anywhere has
# them, so no test skips for want of data; a missing file is a broken checkout and fails loudly here.
DATA_DIR = DEFAULT_DATA_DIR
assert (DATA_DIR / SPEC_BENCH_FILE).is_file(), f"{DATA_DIR / SPEC_BENCH_FILE} is missing: the checkout is incomplete"


@functools.lru_cache(maxsize=None)
def tiny(model_type: str = "llama", num_layers: int = 6, vocab_size: int = 96, seed: int = 0):
    return tiny_model(model_type, num_layers=num_layers, vocab_size=vocab_size, seed=seed)


class Scripted:
    """Follows a fixed schedule of (exit layer or None, draft length) rounds, cycling through it."""

    name = "scripted"

    def __init__(self, schedule):
        self.schedule = list(schedule)

    def reset(self):
        self.i = -1

    def choose_exit(self, state):
        self.i += 1
        layer, self.k = self.schedule[self.i % len(self.schedule)]
        return layer

    def keep_drafting(self, state):
        return state.drafted < self.k


@pytest.fixture(scope="session")
def smollm2():
    """Through the workflow's model cache (config key model_cache), so the workflow tests find it converted;
    test_smollm2 checks it against a direct GGUF load."""
    from lede.drafters.loading import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=REPO / "resources/models")
