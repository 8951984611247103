"""Teacher-forced replay equals the engine; adapters train, save and load with checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.drafters.adapters import exit_agreement, train_adapter
from lede.drafters.distill import (Sequence, accepted_runs, collect, greedy_continuations, replay_static,
                                   sampled_continuations, top_vocab)
from lede.core.exits import AdapterError, AdapterFile, build_exit_heads, load_adapter, load_exit_heads, save_adapter

PROMPTS = [[5, 17, 33, 2, 9], [1], [40, 41, 42, 43, 44, 45, 46, 47], [7, 7, 7, 90]]
LAYERS = [1, 3, 5]


@pytest.fixture(scope="module")
def setup():
    lm = tiny("llama")
    conts = greedy_continuations(lm, PROMPTS, max_new_tokens=40, batch_size=3, progress=False)
    seqs = [Sequence(p, c, category=f"c{i % 2}") for i, (p, c) in enumerate(zip(PROMPTS, conts))]
    return lm, seqs, collect(lm, seqs, LAYERS, progress=False)


def test_batched_continuations_equal_plain_decoding(setup):
    lm, seqs, _ = setup
    dec = Decoder(lm)
    for s in seqs:
        assert dec.generate(s.prompt_ids, Autoregressive(), max_new_tokens=40).token_ids == s.continuation


def test_sampled_continuations_are_reproducible_and_the_models_own(setup):
    """The extra distillation text: reproducible by seed, whatever the global generator's state, which it leaves as it
    found it; it differs from greedy decoding (and between seeds); every token is one the model gives probability at the
    sampling temperature (a near-zero temperature gives the greedy continuation back)."""
    lm, seqs, _ = setup
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sampled_continuations(lm, PROMPTS, 40, temperature=1.0, seed=7, batch_size=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator untouched
    torch.rand(5)  # another global state
    assert sampled_continuations(lm, PROMPTS, 40, temperature=1.0, seed=7, batch_size=3, progress=False) == a
    assert sampled_continuations(lm, PROMPTS, 40, temperature=1.0, seed=8, batch_size=3, progress=False) != a
    assert a != [s.continuation for s in seqs]
    assert all(len(c) == 40 or c[-1] in lm.eos_token_ids for c in a)  # full length, or cut after the EOS
    cold = sampled_continuations(lm, PROMPTS, 40, temperature=1e-4, seed=0, batch_size=3, progress=False)
    assert cold == [s.continuation for s in seqs]
    with pytest.raises(ValueError, match="temperature=0"):
        sampled_continuations(lm, PROMPTS, 4, temperature=0)
    with pytest.raises(ValueError, match="top_p=0"):
        sampled_continuations(lm, PROMPTS, 4, temperature=1.0, top_p=0)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_replay_matches_engine(setup, layer, k):
    """Replaying Static(L, K) on teacher-forced agreements gives the engine's rounds exactly."""
    lm, seqs, data = setup
    agree = exit_agreement(lm, data, layer)
    replay = replay_static(accepted_runs(agree, data.seq, k), data.seq, k)
    dec = Decoder(lm)
    rounds = drafted = accepted = 0
    for s in seqs:
        out = dec.generate(s.prompt_ids, Static(layer, k), max_new_tokens=len(s.continuation))
        assert out.token_ids == s.continuation
        rounds += len(out.rounds)
        drafted += sum(r.drafted for r in out.rounds)
        accepted += sum(r.accepted for r in out.rounds)
    assert (replay.rounds, replay.drafted, replay.accepted) == (rounds, drafted, accepted)
    assert 0 < accepted < drafted  # both outcomes occur, so the comparison means something


def test_accepted_runs_stay_within_a_sequence():
    agree = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert accepted_runs(agree, seq, 10).tolist() == [3, 2, 1, 0, 2, 1, 2, 1]
    assert accepted_runs(agree, seq, 2).tolist() == [2, 2, 1, 0, 2, 1, 2, 1]


def test_adapter_training_raises_agreement_and_engine_stays_exact(setup, tmp_path):
    lm, seqs, data = setup
    before = exit_agreement(lm, data, 1).float().mean()
    adapter, log = train_adapter(lm, data, layer=1, design="linear", epochs=40, lr=3e-2, batch_size=64,
                                 progress=False)
    after = exit_agreement(lm, data, 1, adapter).float().mean()
    assert log.epoch_loss[-1] < log.epoch_loss[0]
    assert after > before, (before, after)

    path = tmp_path / "a.pt"
    save_adapter(path, adapter, AdapterFile(model=lm.name, layer=1, hidden_size=lm.hidden_size, design="linear"))
    loaded = load_adapter(path, lm.name, 1, lm.hidden_size)
    h = data.hidden[1][:5].float()
    assert torch.equal(loaded(h), adapter(h))
    with pytest.raises(AdapterError, match="trained for model"):
        load_adapter(path, "other-model", 1, lm.hidden_size)
    with pytest.raises(AdapterError, match="layer 1 \\(loading for layer 3\\)"):
        load_adapter(path, lm.name, 3, lm.hidden_size)
    with pytest.raises(AdapterError, match="exit adapter not found at .*missing.pt"):
        load_adapter(tmp_path / "missing.pt", lm.name, 1, lm.hidden_size)

    vocab = top_vocab(seqs, 24)
    heads = build_exit_heads(lm, {1: loaded, 3: None, 5: None}, vocab=vocab)

    # a selection file names its adapters relative to itself: the results folder can move whole
    run = tmp_path / "run" / "exits"
    (run / "adapters").mkdir(parents=True)
    path.rename(run / "adapters" / "L1.pt")
    (run / "selected.json").write_text(json.dumps(
        {"vocab": vocab.tolist(), "layers": {"1": "adapters/L1.pt", "3": None, "5": None}}))
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    from_file = load_exit_heads(lm, moved / "exits" / "selected.json")
    hd = data.hidden[1][:5].to(lm.dtype)
    assert sorted(from_file) == [1, 3, 5] and torch.equal(from_file[1](hd), heads[1](hd))
    with pytest.raises(AdapterError, match="exit_report"):
        load_exit_heads(lm, tmp_path / "run" / "exits" / "selected.json")
    dec = Decoder(lm, exit_heads=heads)
    for s in seqs:
        out = dec.generate(s.prompt_ids, RandomSchedule(LAYERS, 5, seed=len(s.prompt_ids)), max_new_tokens=40)
        assert out.token_ids == s.continuation


def test_reduced_vocab_head_drafts_only_from_the_set(setup):
    lm, seqs, _ = setup
    vocab = top_vocab(seqs, 10)
    head = build_exit_heads(lm, {3: None}, vocab=vocab)[3]
    logits = head(torch.randn(4, lm.hidden_size, dtype=lm.dtype))
    assert set(logits.argmax(-1).tolist()) <= set(vocab.tolist())
    assert torch.isinf(logits).sum() == 4 * (lm.config.vocab_size - 10)


def test_decoder_adapter_trains_on_whole_sequences_and_loads_with_its_model(setup, tmp_path):
    """The Kangaroo-style design: starts as the plain head (zero output projections), trains on whole sequences,
    saves and loads (needing the model's layer as template), and drafts in the engine without changing the output."""
    from lede.drafters.adapters import adapted_rows
    from lede.core.exits import ContextLayer, build_adapter

    lm, seqs, data = setup
    template = lm.model.model.layers[-1]
    fresh = build_adapter("decoder", lm.hidden_size, template=template).to(lm.dtype)
    assert torch.allclose(adapted_rows(lm, data, 1, fresh, seqs), data.hidden[1].to(lm.dtype), atol=1e-10)
    before = exit_agreement(lm, data, 1).float().mean()
    with pytest.raises(ValueError, match="whole sequences"):
        train_adapter(lm, data, layer=1, design="decoder", epochs=1, progress=False)
    with pytest.raises(ValueError, match="init='first'"):
        train_adapter(lm, data, layer=1, design="decoder", sequences=seqs, init="first", progress=False)
    adapter, log = train_adapter(lm, data, layer=1, design="decoder", epochs=30, lr=3e-3, batch_tokens=64,
                                 sequences=seqs, progress=False)
    assert isinstance(adapter, ContextLayer) and log.epoch_loss[-1] < log.epoch_loss[0] / 2
    after = exit_agreement(lm, data, 1, adapter, sequences=seqs).float().mean()
    assert after > before + 0.1, (before, after)
    with pytest.raises(ValueError, match="pass the distillation sequences"):
        exit_agreement(lm, data, 1, adapter)

    path = tmp_path / "d.pt"
    save_adapter(path, adapter, AdapterFile(model=lm.name, layer=1, hidden_size=lm.hidden_size, design="decoder"))
    with pytest.raises(AdapterError, match="template=lm.model.model.layers"):
        load_adapter(path, lm.name, 1, lm.hidden_size)
    loaded = load_adapter(path, lm.name, 1, lm.hidden_size, template=template)
    assert torch.equal(adapted_rows(lm, data, 1, loaded.to(lm.dtype), seqs),
                       adapted_rows(lm, data, 1, adapter.to(lm.dtype), seqs))
    dec = Decoder(lm, exit_heads=build_exit_heads(lm, {1: loaded, 3: None}))
    for s in seqs:
        out = dec.generate(s.prompt_ids, RandomSchedule([1, 3], 5, seed=len(s.prompt_ids)), max_new_tokens=40)
        assert out.token_ids == s.continuation


def test_batched_continuations_with_the_cpu_kernels_equal_plain_decoding():
    """The real model runs with lede's CPU kernels (CpuLinear, the lede_sdpa attention: loaded with
    the default kernels="lede"). Left-padded batches through them once gave garbage for every padded row, so the
    distillation data (adapters, replayed experience, the replayed evaluation) was not the model's output;
    the engine, one sequence at a time, was unaffected. Float32, prompts of different lengths in one batch."""
    from lede.core.kernels import use_cpu_kernels
    from lede.testing import tiny_model

    lm = tiny_model("llama", dtype=torch.float32, seed=3)
    assert use_cpu_kernels(lm.model) > 0
    prompts = [[5, 17, 33, 2, 9], [1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7, 7, 7, 90]]
    conts = greedy_continuations(lm, prompts, max_new_tokens=24, batch_size=4, progress=False)
    dec = Decoder(lm)
    for p, c in zip(prompts, conts):
        assert dec.generate(p, Autoregressive(), max_new_tokens=24).token_ids == c, p


def test_transformers_prompt_lookup_on_the_cpu_kernels_is_exact():
    """The bench's hf_prompt_lookup runs transformers' generate on the engine's kernels. Its verification passes
    (several queries after a cached context) went unmasked through lede_sdpa before the mask function was
    registered: its output differed from plain decoding on every evaluation prompt (identity 0%)."""
    from lede.eval.bench import HF_PROMPT_LOOKUP, BenchPrompt, run_bench
    from lede.core.kernels import use_cpu_kernels
    from lede.testing import tiny_model

    lm = tiny_model("llama", dtype=torch.float32, seed=3)
    use_cpu_kernels(lm.model)
    prompts = [BenchPrompt("a", "c", (5, 17, 33, 2, 9, 5, 17, 33)), BenchPrompt("b", "c", (7, 7, 7, 90, 7, 7))]
    records = run_bench(Decoder(lm), prompts, {HF_PROMPT_LOOKUP: HF_PROMPT_LOOKUP}, max_new_tokens=24, warmup=0,
                        progress=False)
    assert [r.identical for r in records if r.config == HF_PROMPT_LOOKUP] == [True, True]


def test_draft_vocabulary_counts_greedy_text_only():
    """Sampled distillation text trains the adapters but does not widen the draft vocabulary."""
    seqs = [Sequence([1], [5, 6, 6, 7]), Sequence([1], [9, 9, 9, 9, 8], sampled=True), Sequence([2], [6, 7, 7])]
    assert top_vocab(seqs, 2).tolist() == [6, 7]
    assert top_vocab(seqs, 10).tolist() == [5, 6, 7]
