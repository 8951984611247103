"""The FullInfo learner: every action's outcome at a round start, and the fitted round-level policy (tiny models)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.core.costs import round_costs
from lede.drafters.distill import Sequence, collect
from lede.core.exits import build_exit_heads
from lede.rl.features import ActionSpace, feature_names
from lede.rl.fullinfo import _Probe, fit_round_values, train_full_information
from lede.core.policy import LOOKUP
from lede.rl.replay import ReplayDecoder, ReplayOracle, replay_tables
from lede.rl.offline import PolicyError, RLPolicy
from test_replay import COSTS, DRAFTERS, LAYERS, PROMPTS

KMAX = 6
RSPACE = ActionSpace(DRAFTERS, KMAX, per_round=True)


@pytest.fixture(scope="module")
def setup():
    lm = tiny("llama")
    dec = Decoder(lm, exit_heads=build_exit_heads(lm, {l: None for l in LAYERS}, None), max_draft_len=KMAX)
    seqs = [Sequence(ids, dec.generate(ids, Autoregressive(), max_new_tokens=40).token_ids, cat, uid)
            for uid, cat, ids in PROMPTS]
    data = collect(lm, seqs, list(LAYERS), progress=False, store_dtype=lm.dtype)
    tables = replay_tables(lm, {l: dec.head(l) for l in LAYERS}, seqs, data, progress=False)
    return lm, dec, seqs, ReplayDecoder(lm, tables, max_draft_len=KMAX)


class RandomRound:
    """A uniformly random per-round action each round; remembers the ids it chose."""

    name = "random_round"

    def __init__(self, seed: int):
        self.rng, self.chosen, self._k = random.Random(seed), [], 0

    def reset(self) -> None:
        pass

    def choose_exit(self, state):
        a = self.rng.randrange(RSPACE.size)
        self.chosen.append(a)
        layer, self._k = RSPACE.round_of(a)
        return layer

    def keep_drafting(self, state) -> bool:
        return state.drafted < self._k


@pytest.mark.parametrize("budget", [40, 9])
def test_outcomes_are_the_rounds_that_happen(setup, budget):
    """At every round start, the outcome predicted for the action taken is the round the replay (= the engine,
    tests/test_replay.py) then runs: its tokens, and its time priced as replay_speed prices it."""
    lm, dec, seqs, replay = setup
    checked = drafted = 0
    for seed in range(6):
        for s in seqs:
            pol = RandomRound(seed)
            probe = _Probe(pol, replay, RSPACE, COSTS)
            gen = replay.generate(s.prompt_ids, probe, max_new_tokens=budget)
            assert len(probe.outcomes) == len(gen.rounds) == len(pol.chosen)
            for a, o, r, cm in zip(pol.chosen, probe.outcomes, gen.rounds, round_costs(COSTS, len(s.prompt_ids), gen.rounds)):
                assert o.tokens[a] == r.emitted
                assert o.cost[a] == pytest.approx(cm.round_ms(r.exit_layer, r.drafted) / cm.plain_ms, rel=1e-6)
                assert o.tokens[0] == 1 and (o.tokens >= 1).all() and (o.tokens <= KMAX + 1).all()
                checked += 1
                drafted += r.drafted > 0
    assert checked > 50 and drafted > 20


def test_lookup_outcomes_follow_the_proposal(setup):
    """A lookup round drafts at most what the context proposes: K beyond the proposal costs and pays as the
    proposal's length; with no proposal, a lookup action is a plain step."""
    lm, dec, seqs, replay = setup
    i = DRAFTERS.index(LOOKUP)
    lookup, plain = [], []
    for s in seqs:
        probe = _Probe(Static(LOOKUP, 1), replay, RSPACE, COSTS)
        replay.generate(s.prompt_ids, probe, max_new_tokens=40)
        lookup += [o.cost[1 + i * KMAX : 1 + (i + 1) * KMAX] for o in probe.outcomes]
        plain += [o.cost[0] for o in probe.outcomes]
    assert any(c[0] == c[-1] == p for c, p in zip(lookup, plain))  # no proposal: a plain step
    assert any(c[0] < c[-1] for c in lookup)  # a proposal: longer K costs more...
    for c in lookup:  # ...up to the proposal's length, then the same
        grows = np.flatnonzero(np.diff(c) > 0)
        assert (np.diff(c) >= 0).all() and (grows.size == 0 or (grows == np.arange(grows.size)).all())


def test_fit_recovers_the_better_action_per_state():
    """Least squares on full-information values: in each of two states the action with the higher mean wins."""
    rng = np.random.default_rng(0)
    space = ActionSpace(DRAFTERS, 2, per_round=True)
    n, f = 4000, len(feature_names(space))
    x = np.zeros((n, f), np.float32)
    x[:, 0] = 1.0
    x[:, 1] = rng.integers(0, 2, n)  # the state: position feature 0 or 1
    v = rng.normal(0.0, 1.0, (n, space.size)).astype(np.float32)
    v[:, 3] += np.where(x[:, 1] == 0, 2.0, 0.0)  # action 3 pays in state 0 (noisy, mean +2)
    v[:, 5] += np.where(x[:, 1] == 1, 2.0, 0.0)  # action 5 in state 1
    pf, mse = fit_round_values(x, v, space, "m", epochs=20)
    pol = RLPolicy(pf)
    probe = np.zeros((2, f), np.float32)
    probe[:, 0], probe[1, 1] = 1.0, 1.0
    assert pol.choose(probe, space.valid_mask(True)).tolist() == [3, 5]
    assert pf.decision == "round" and pf.algo == "FullInfo" and 0.8 < mse < 1.2  # the noise, not more
    with pytest.raises(PolicyError, match="no round starts"):
        fit_round_values(x[:0], v[:0], space, "m")
    with pytest.raises(PolicyError, match="do not match"):
        fit_round_values(x, v[:, :3], space, "m")


def test_trained_policy_decodes_exactly_and_saves(setup, tmp_path):
    lm, dec, seqs, replay = setup
    space = ActionSpace(DRAFTERS, KMAX)
    behaviours = [Static(LOOKUP, 2), Static(1, 1), RandomSchedule(list(DRAFTERS), KMAX, seed=0, p_plain=0.2),
                  Autoregressive(), ReplayOracle(replay.tables, COSTS, KMAX, lookup=True)]
    prompts = [s.prompt_ids for s in seqs if s.continuation]
    res = train_full_information(replay, prompts, behaviours, space, COSTS, lm.name, rate_iterations=1, epochs=5,
                                 max_new_tokens=40)
    assert [h["iteration"] for h in res.history] == [0, 1] and res.rates[1] == pytest.approx(res.history[0]["replay_aggregate"])
    assert res.states > sum(len(s.continuation) for s in seqs) // KMAX  # the behaviours' round starts and the refit's
    res.policy.save(tmp_path / "p.pt")
    policy = RLPolicy.load(tmp_path / "p.pt", lm_name=lm.name, exit_layers=DRAFTERS)
    assert policy.space.per_round and policy.name == "lede_FullInfo_s0"
    for _, _, ids in PROMPTS:
        assert dec.generate(ids, policy, max_new_tokens=30).token_ids == dec.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
    with pytest.raises(PolicyError, match="no training prompts"):
        train_full_information(replay, [], behaviours, space, COSTS, lm.name)
