"""Teacher-forced replay gives the engine's episodes: rounds, tokens, actions and rewards (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.core.costs import CostModel
from lede.drafters.distill import Sequence, collect
from lede.core.exits import build_adapter, build_exit_heads
from lede.rl.features import ActionSpace, decision_rewards
from lede.rl.heuristics import AdaptiveDraftLength, ConfidenceThreshold, DynamicExit
from lede.rl.oracle import Oracle, oracle_runs
from lede.core.policy import LOOKUP
from lede.rl.replay import (ReplayDecoder, ReplayedSpeed, ReplayOracle, replay_speed, replay_tables,
                         select_by_replay)
from lede.rl.offline import EpsilonPerturbed, Experience, PolicyError, Recorder, collect_experience

LAYERS = (1, 3, 5)
DRAFTERS = (LOOKUP, *LAYERS)  # the policies' candidates: prompt lookup and the exit layers
SPACE = ActionSpace(DRAFTERS, 6)
PROMPTS = [("p0", "a", [5, 17, 33, 2, 9]), ("p1", "b", [40, 41, 42, 43]), ("p2", "a", [7, 7, 7, 90, 3]),
           ("p3", "b", [1])]
COSTS = CostModel(model="tiny-llama-s0", dtype="float32", device="cpu", threads=1, context_len=8,
                  draft_ms={l: 0.1 * l + 0.01 for l in DRAFTERS}, verify_ms={t: 1.0 + 0.05 * (t - 1) for t in range(1, 8)},
                  draft_plain_ms={l: 0.1 * l + 0.01 for l in DRAFTERS})


def behaviours():
    """Policies whose decisions do not read the draft's confidence: their replayed episodes are exact."""
    return ([Static(l, k) for l in DRAFTERS for k in (1, 2, 5)]
            + [RandomSchedule(list(DRAFTERS), 6, seed=s, p_plain=0.2) for s in range(3)]
            + [EpsilonPerturbed(AdaptiveDraftLength(3, initial=2, max_len=6), SPACE, 0.3, seed=1),
               EpsilonPerturbed(DynamicExit(LAYERS, COSTS, 6), SPACE, 0.3, seed=2), Autoregressive()])


def context_adapters(lm, seed=0):
    """Kangaroo-style context adapters (copies of the last layer, perturbed so that they differ per layer)."""
    torch.manual_seed(seed)
    out = {}
    for l in LAYERS:
        out[l] = build_adapter("decoder", lm.hidden_size, template=lm.model.model.layers[-1])
        for p in out[l].parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return out


@pytest.fixture(scope="module", params=["plain heads", "reduced vocabulary", "context adapters"])
def setup(request):
    """The replay drafts from teacher-forced tables; with context adapters their drafts are computed over whole
    sequences, so equal episodes also show that the engine's context caches hold the right states."""
    lm = tiny("llama")
    vocab = torch.arange(0, 96, 2) if request.param == "reduced vocabulary" else None
    adapters = context_adapters(lm) if request.param == "context adapters" else {l: None for l in LAYERS}
    dec = Decoder(lm, exit_heads=build_exit_heads(lm, adapters, vocab), max_draft_len=6)
    seqs = [Sequence(ids, dec.generate(ids, Autoregressive(), max_new_tokens=40).token_ids, cat, uid)
            for uid, cat, ids in PROMPTS]
    data = collect(lm, seqs, list(LAYERS), progress=False, store_dtype=lm.dtype)
    tables = replay_tables(lm, {l: dec.head(l) for l in LAYERS}, seqs, data, progress=False)
    return lm, dec, seqs, ReplayDecoder(lm, tables, max_draft_len=6)


@pytest.mark.parametrize("budget", [40, 17, 2])
def test_replayed_episodes_equal_the_engines(setup, budget):
    lm, dec, seqs, replay = setup
    drafted = accepted = approx = 0
    copied = {True: 0, False: 0}  # lookup drafts accepted / rejected
    for s in seqs:
        for policy in behaviours():
            rec_e, rec_r = Recorder(policy, SPACE), Recorder(policy, SPACE)
            n = min(budget, len(s.continuation))
            eng = dec.generate(s.prompt_ids, rec_e, max_new_tokens=n)
            rep = replay.generate(s.prompt_ids, rec_r, max_new_tokens=budget)
            assert rep.token_ids == eng.token_ids == s.continuation[:n] and rep.finish_reason == eng.finish_reason
            key = lambda rs: [(r.exit_layer, r.drafted, r.accepted) for r in rs]  # noqa: E731
            assert key(rep.rounds) == key(eng.rounds), policy.name
            assert rec_r.actions == rec_e.actions
            if rec_e.actions:
                assert decision_rewards(rec_r.actions, rep.rounds, SPACE, COSTS) == \
                    decision_rewards(rec_e.actions, eng.rounds, SPACE, COSTS)
            # the logged states agree except at decisions after a wrong draft (the engine drafts on from it)
            exact = ~np.asarray(rep.approx, dtype=bool)
            assert len(rep.approx) == len(rec_r.obs)
            if rec_e.obs:
                np.testing.assert_allclose(np.asarray(rec_r.obs)[exact], np.asarray(rec_e.obs)[exact], atol=1e-5)
            for r in eng.rounds:
                if r.exit_layer == LOOKUP:
                    copied[True] += r.accepted
                    copied[False] += r.drafted - r.accepted
            drafted += sum(r.drafted for r in eng.rounds)
            accepted += sum(r.accepted for r in eng.rounds)
            approx += sum(rep.approx)
    if budget > 2:  # both outcomes occur, so the comparison means something
        assert 0 < accepted < drafted and approx > 0
    if budget == 40:
        assert copied[False] > 0  # lookup rounds happen (a random 96-token model rarely repeats: see the next test)


def test_lookup_drafts_replay_exactly_and_the_oracle_takes_them():
    """On a model with a small vocabulary (its greedy output repeats itself, so prompt lookup is sometimes right):
    lookup rounds replay as the engine runs them, accepted and rejected drafts both occur, and the oracle's
    lookup run lengths are the engine's."""
    from lede.testing import tiny_model

    lm = tiny_model("llama", vocab_size=12)
    dec = Decoder(lm, max_draft_len=6)
    seqs = [Sequence(ids, dec.generate(ids, Autoregressive(), max_new_tokens=40).token_ids, "a", str(i))
            for i, ids in enumerate([[5, 1, 3, 2, 0], [4, 1, 4, 3], [7, 7, 7, 2, 3], [1]])]
    data = collect(lm, seqs, list(LAYERS), progress=False, store_dtype=lm.dtype)
    replay = ReplayDecoder(lm, replay_tables(lm, {l: dec.head(l) for l in LAYERS}, seqs, data, progress=False), 6)
    outcome, took = [0, 0], 0
    for s in seqs:
        for policy in [Static(LOOKUP, 1), Static(LOOKUP, 5), RandomSchedule(list(DRAFTERS), 6, seed=3, p_plain=0.1)]:
            eng = dec.generate(s.prompt_ids, policy, max_new_tokens=len(s.continuation))
            rep = replay.generate(s.prompt_ids, policy, max_new_tokens=len(s.continuation))
            assert eng.token_ids == rep.token_ids == s.continuation
            assert [(r.exit_layer, r.drafted, r.accepted) for r in rep.rounds] == \
                [(r.exit_layer, r.drafted, r.accepted) for r in eng.rounds]
            if isinstance(policy, Static):  # lookup drafts do not depend on earlier drafts: nothing approximate
                assert not any(rep.approx)
            for r in eng.rounds:
                if r.exit_layer == LOOKUP:
                    outcome[0] += r.accepted
                    outcome[1] += r.drafted - r.accepted
        runs = oracle_runs(lm, {l: dec.head(l) for l in LAYERS}, s.prompt_ids, s.continuation, list(DRAFTERS))
        oracle = ReplayOracle(replay.tables, COSTS, 6, lookup=True)
        eng = dec.generate(s.prompt_ids, Oracle(runs, COSTS, 6), max_new_tokens=len(s.continuation))
        rep = replay.generate(s.prompt_ids, oracle, max_new_tokens=len(s.continuation))
        assert [(r.exit_layer, r.drafted, r.accepted) for r in rep.rounds] == \
            [(r.exit_layer, r.drafted, r.accepted) for r in eng.rounds]
        assert all(r.accepted == r.drafted for r in eng.rounds if r.exit_layer == LOOKUP)  # hindsight: no waste
        took += sum(r.exit_layer == LOOKUP for r in eng.rounds)
        # the oracle of lookup alone: the engine's oracle with only the lookup runs
        alone = replay.generate(s.prompt_ids, ReplayOracle(replay.tables, COSTS, 6, lookup=True, exits=False),
                                max_new_tokens=len(s.continuation))
        eng = dec.generate(s.prompt_ids, Oracle({LOOKUP: runs[LOOKUP]}, COSTS, 6), max_new_tokens=len(s.continuation))
        assert [(r.exit_layer, r.drafted, r.accepted) for r in alone.rounds] == \
            [(r.exit_layer, r.drafted, r.accepted) for r in eng.rounds]
        assert {r.exit_layer for r in alone.rounds} <= {None, LOOKUP}
    assert outcome[0] > 0 and outcome[1] > 0 and took > 0
    assert ReplayOracle(replay.tables, COSTS, 6, lookup=True, exits=False).name == "oracle_lookup"
    with pytest.raises(ValueError, match="no drafter"):
        ReplayOracle(replay.tables, COSTS, 6, lookup=False, exits=False)
    # the exit report's lookup rows (the static sweep's layer-0 cells) are the replay of Static(LOOKUP, K)
    from lede.drafters.report import lookup_rows

    for row in lookup_rows(data, "dev", seqs, [1, 3, 6], COSTS):
        if row.category == "all":
            speed = replay_speed(replay, [s.prompt_ids for s in seqs], Static(LOOKUP, row.draft_len), COSTS, 40)
            assert row.replay_speedup == pytest.approx(speed.aggregate) and row.tokens_per_round == pytest.approx(
                speed.tokens / speed.rounds), row


def test_collect_experience_from_replay_matches_the_engine(setup):
    lm, dec, seqs, replay = setup
    budget = 24
    prompts = [(s.uid, s.category, s.prompt_ids) for s in seqs]
    ref = collect_experience(dec, prompts, behaviours(), SPACE, COSTS, budget, progress=False)
    before = replay.approx_decisions
    exp = collect_experience(replay, prompts, behaviours(), SPACE, COSTS, budget, progress=False)
    assert np.array_equal(exp.actions, ref.actions) and np.array_equal(exp.rewards, ref.rewards)
    assert np.array_equal(exp.terminals, ref.terminals) and exp.behaviour == ref.behaviour
    assert exp.meta["replay"]["approx_decisions"] > before
    both = Experience.concat([ref, exp])
    assert len(both) == 2 * len(ref) and both.terminals.sum() == 2 * len(ref.behaviour)
    assert both.episode.max() == 2 * len(ref.behaviour) - 1
    assert both.meta["model"] == lm.name and both.meta["reward_weight"] == 1.0  # what train_policy stamps on the policy
    other = Experience(*[getattr(exp, f) for f in ("space", "names", "obs", "actions", "rewards", "terminals", "episode",
                                                   "behaviour", "prompt", "category")], meta={**exp.meta, "model": "x"})
    with pytest.raises(PolicyError, match="different models"):
        Experience.concat([ref, other])
    with pytest.raises(PolicyError, match="feature layouts"):
        Experience.concat([ref, Experience(ActionSpace((1, 3), 6), *[getattr(ref, f) for f in (
            "names", "obs", "actions", "rewards", "terminals", "episode", "behaviour", "prompt", "category")])])


def test_a_confidence_reading_policy_runs_and_keeps_the_tokens(setup):
    """Its decisions after a wrong draft see the teacher-forced confidence (documented approximation): the
    emitted tokens stay the model's greedy continuation whatever it decides."""
    lm, dec, seqs, replay = setup
    for s in seqs:
        out = replay.generate(s.prompt_ids, ConfidenceThreshold(3, 0.05, 6), max_new_tokens=40)
        assert out.token_ids == s.continuation


def test_replayed_speed_is_the_engines_rounds_timed_by_the_cost_model(setup):
    lm, dec, seqs, replay = setup
    prompts = [s.prompt_ids for s in seqs]
    plain = replay_speed(replay, prompts, Autoregressive(), COSTS, max_new_tokens=30)
    assert plain.speedups == [1.0] * len(seqs) and plain.drafted == 0 and plain.tokens == plain.rounds
    for policy in [Static(3, 2), Static(1, 5), Static(LOOKUP, 4),
                   EpsilonPerturbed(DynamicExit(LAYERS, COSTS, 6), SPACE, 0.3, seed=2)]:
        speed = replay_speed(replay, prompts, policy, COSTS, max_new_tokens=30)
        expected, tokens = [], 0
        for s in seqs:  # the same number from the engine's own rounds
            rounds = dec.generate(s.prompt_ids, policy, max_new_tokens=min(30, len(s.continuation))).rounds
            if rounds:
                cost = sum(COSTS.round_ms(r.exit_layer, r.drafted) / COSTS.plain_ms for r in rounds)
                expected.append(sum(r.emitted for r in rounds) / cost)
                tokens += sum(r.emitted for r in rounds)
        assert speed.speedups == pytest.approx(expected) and speed.tokens == tokens, policy.name
        assert speed.median == pytest.approx(float(np.median(expected))) and speed.decisions > speed.approx_decisions
    # replays of disjoint sequence sets combine into the replay of their union
    whole = replay_speed(replay, prompts, Static(3, 2), COSTS, max_new_tokens=30)
    combined = ReplayedSpeed.combine([replay_speed(replay, [ids], Static(3, 2), COSTS, max_new_tokens=30)
                                      for ids in prompts])
    assert combined.speedups == whole.speedups and combined.cost == pytest.approx(whole.cost)
    assert (combined.tokens, combined.rounds, combined.drafted, combined.decisions) == \
        (whole.tokens, whole.rounds, whole.drafted, whole.decisions)
    # the oracle from the replay tables makes the engine oracle's rounds, and no static cell is cheaper
    oracle = ReplayOracle(replay.tables, COSTS, 6, lookup=True)
    for s in seqs:
        runs = oracle_runs(lm, {l: dec.head(l) for l in LAYERS}, s.prompt_ids, s.continuation, list(DRAFTERS))
        eng = dec.generate(s.prompt_ids, Oracle(runs, COSTS, 6), max_new_tokens=len(s.continuation))
        rep = replay.generate(s.prompt_ids, oracle, max_new_tokens=len(s.continuation))
        assert [(r.exit_layer, r.drafted, r.accepted) for r in rep.rounds] == \
            [(r.exit_layer, r.drafted, r.accepted) for r in eng.rounds]
    best = replay_speed(replay, prompts, oracle, COSTS, max_new_tokens=40)
    for policy in [Static(l, k) for l in DRAFTERS for k in (1, 2, 5)]:
        assert best.aggregate >= replay_speed(replay, prompts, policy, COSTS, max_new_tokens=40).aggregate - 1e-9


def test_selection_by_replay_takes_the_fastest_candidate(setup):
    lm, dec, seqs, replay = setup
    prompts = [s.prompt_ids for s in seqs]
    candidates = [Autoregressive(), Static(1, 5), ReplayOracle(replay.tables, COSTS, 6, lookup=True), Static(3, 2)]
    sel = select_by_replay(replay, prompts, candidates, COSTS, max_new_tokens=30)
    expected = [replay_speed(replay, prompts, p, COSTS, max_new_tokens=30).median for p in candidates]
    assert sel.medians == pytest.approx(expected)
    assert sel.best == 2 and sel.medians[2] > 1.0 == sel.medians[0]  # the oracle, never plain decoding
    assert select_by_replay(replay, prompts, [Autoregressive(), Autoregressive()], COSTS, 30).best == 0  # ties: first
    with pytest.raises(ValueError, match="at least one"):
        select_by_replay(replay, prompts, [], COSTS)


def test_unknown_prompts_and_layers_fail_clearly(setup):
    lm, dec, seqs, replay = setup
    with pytest.raises(KeyError, match="no replay table"):
        replay.generate([3, 2, 1, 0], Static(1, 2))
    with pytest.raises(ValueError, match="not in the replay tables"):
        replay.generate(seqs[0].prompt_ids, Static(2, 2))
    data = collect(lm, seqs, [1], progress=False)
    with pytest.raises(ValueError, match=r"no hidden states for exit layers \[3\]"):
        replay_tables(lm, {1: dec.head(1), 3: dec.head(3)}, seqs, data, progress=False)


@pytest.mark.parametrize("scale", [0.5, 5.0, 40.0])
def test_confidence_one_row_equals_the_batched_formula_and_softmax(scale):
    """The engine's per-row confidence (numpy) and the replay tables' batched one (torch) are the same
    numbers, and both are softmax's top-1 probability, top-1 − top-2 margin and entropy; a -inf logit (a
    token outside a draft vocabulary) and a tied maximum are handled."""
    from lede.core.policy import Confidence, top_prob_margin_entropy

    x = torch.randn(4, 3000, generator=torch.Generator().manual_seed(int(scale))) * scale
    x[1, ::3] = -torch.inf
    x[2, 7] = x[2, 11] = x[2].max() + 1  # tie at the top: margin 0
    p = torch.softmax(x.double(), -1)
    top2 = torch.topk(p, 2, -1).values
    ref = np.stack([top2[:, 0], top2[:, 0] - top2[:, 1], -(p * p.clamp_min(1e-300).log()).sum(-1)], 1)
    batched = np.stack([t.numpy() for t in top_prob_margin_entropy(x)], 1)
    rows = np.array([[c.top_prob, c.margin, c.entropy] for c in map(Confidence, x)])
    np.testing.assert_allclose(batched, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows, ref, rtol=1e-4, atol=1e-5)
    assert rows[2, 1] == 0.0 and not np.isnan(rows).any()
    # a reduced draft vocabulary: reading only its ids (the engine passes the head's set) gives the same numbers
    support = torch.arange(1, 3000, 3)
    padded = torch.full((3000,), -torch.inf)
    padded[support] = x[0, support]
    full, part = Confidence(padded), Confidence(padded, support)
    assert part.logits is padded and part.support is support
    np.testing.assert_allclose([part.top_prob, part.margin, part.entropy], [full.top_prob, full.margin, full.entropy],
                               rtol=1e-6)
