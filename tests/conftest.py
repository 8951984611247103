"""Shared fixtures: tiny random models (cached per process) and the real SmolLM2 (integration only)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from lede.data import SPEC_BENCH_FILE
from lede.testing import tiny_model

torch.set_num_threads(int(os.environ.get("LEDE_TEST_THREADS", "2")))
REPO = Path(__file__).resolve().parents[1]
# The real benchmark files (never copied into the repo): LEDE_DATA_DIR, else ../shared/data beside the clone, as on
# our machines. Tests that need them skip with this message when the folder is missing; the workflow tests pass it
# to snakemake as `--config data_dir=...` (config.yaml's relative default resolves only beside shared/).
DATA_DIR = Path(os.environ.get("LEDE_DATA_DIR") or REPO.parent / "shared" / "data").resolve()
HAVE_DATA = (DATA_DIR / SPEC_BENCH_FILE).is_file()
NO_DATA = f"real benchmark data not found at {DATA_DIR} (set LEDE_DATA_DIR to the folder holding spec_bench/)"
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=NO_DATA)


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
    from lede.model import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=REPO / "resources/models")
