"""Baseline policies (lede.rl.heuristics): exactness on tiny random models, and each policy's rule."""

from __future__ import annotations

import functools
import math

import pytest

from conftest import tiny
from lede import Autoregressive, Decoder, DecodeState, Policy, RoundRecord
from lede.core.costs import CostModel
from lede.rl.heuristics import (
    AdaptiveDraftLength,
    ConfidenceThreshold,
    DynamicExit,
    expected_tokens,
    tune_threshold,
)

PROMPTS = ([5, 17, 33, 2, 9], list(range(1, 30)))
N = 40
LAYERS = [1, 3, 5]


def costs(draft: float = 0.1, verify_slope: float = 0.05, max_t: int = 17) -> CostModel:
    """A hand-made cost model: draft_ms[L] = draft * L, verify_ms[T] = 1 + verify_slope * T."""
    draft_ms = {l: draft * l for l in range(1, 6)}
    return CostModel(
        model="tiny", dtype="float64", device="cpu", threads=1, context_len=64, draft_ms=draft_ms,
        verify_ms={t: 1.0 + verify_slope * t for t in range(1, max_t + 1)}, draft_plain_ms=dict(draft_ms),
    )


@functools.lru_cache(maxsize=None)
def decoder() -> Decoder:
    return Decoder(tiny("llama"))


@functools.lru_cache(maxsize=None)
def reference(prompt: tuple[int, ...], n: int = N) -> list[int]:
    return decoder().generate(list(prompt), Autoregressive(), max_new_tokens=n).token_ids


def run(policy, prompt, n: int = N):
    """Generate with ``policy``, check the output equals plain greedy decoding, return it."""
    out = decoder().generate(list(prompt), policy, max_new_tokens=n)
    assert out.token_ids == reference(tuple(prompt), n), policy.name
    assert all(0 <= r.accepted <= r.drafted for r in out.rounds)
    return out


def budgets(out, n: int = N) -> list[int]:
    """Tokens each round was still allowed to emit (the loop drafts at most budget - 1)."""
    left, res = n - 1, []  # the prefill emits the first token
    for r in out.rounds:
        res.append(left)
        left -= r.emitted
    return res


def record(layer, drafted, accepted) -> RoundRecord:
    return RoundRecord(layer, drafted, accepted, 0.0, 0.0, 0.0)


def state(rounds=(), tokens: int = 1, max_new: int = 100) -> DecodeState:
    return DecodeState(6, 3, max_new, tokens=[0] * tokens, rounds=list(rounds))


def test_policies_satisfy_the_protocol():
    for p in (AdaptiveDraftLength(2), ConfidenceThreshold(2, 0.5, 4), DynamicExit(LAYERS, costs(), 4)):
        assert isinstance(p, Policy) and isinstance(p.name, str)


# ---- AdaptiveDraftLength -------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("layer, initial, max_len", [(5, 4, 16), (3, 2, 3)])
def test_adaptive_follows_plus2_minus1_and_is_exact(prompt, layer, initial, max_len):
    policy = AdaptiveDraftLength(layer, initial=initial, max_len=max_len)
    out = run(policy, prompt)
    k, grew, shrank = initial, False, False
    for r, budget in zip(out.rounds, budgets(out)):
        assert r.drafted == min(k, budget - 1), (k, budget, r)
        assert r.exit_layer == (layer if r.drafted else None)
        if r.drafted:
            full = r.accepted == r.drafted
            grew |= full and k < max_len
            shrank |= not full and k > 1
            k = min(k + 2, max_len) if full else max(k - 1, 1)
    assert grew and shrank, "the run should exercise both branches of the rule"


def test_adaptive_clamps_ignores_empty_rounds_and_resets():
    p = AdaptiveDraftLength(2, initial=3, max_len=6, min_len=2)
    rounds = []

    def step(rec):
        rounds.append(rec)
        p.choose_exit(state(rounds))
        return p.k

    assert p.choose_exit(state()) == 2 and p.k == 3
    assert [step(record(2, p.k, p.k)) for _ in range(3)] == [5, 6, 6]  # +2, clamped at max_len
    assert [step(record(2, p.k, 0)) for _ in range(6)] == [5, 4, 3, 2, 2, 2]  # -1, clamped at min_len
    assert step(record(None, 0, 0)) == 2  # a plain / budget-capped round changes nothing
    assert step(record(2, 2, 1)) == 2
    assert step(record(2, 2, 2)) == 4
    st = state(rounds, tokens=1)
    st.drafted = 3
    assert p.keep_drafting(st)  # k == 4
    st.drafted = 4
    assert not p.keep_drafting(st)
    p.reset()
    assert p.k == 3
    p.choose_exit(state([record(2, 3, 3)]))  # a fresh generation: only its own rounds count
    assert p.k == 5
    with pytest.raises(ValueError, match="min_len"):
        AdaptiveDraftLength(2, initial=5, max_len=4)
    with pytest.raises(ValueError, match="exit_layer=0"):
        AdaptiveDraftLength(0)


# ---- ConfidenceThreshold -------------------------------------------------------------------------
def test_confidence_threshold_extremes():
    prompt = PROMPTS[0]
    out = run(ConfidenceThreshold(4, 0.0, 5), prompt)
    assert [r.drafted for r in out.rounds] == [min(5, b - 1) for b in budgets(out)]
    out = run(ConfidenceThreshold(4, 1.01, 5), prompt)
    assert [r.drafted for r in out.rounds] == [min(1, b - 1) for b in budgets(out)]
    assert {r.exit_layer for r in out.rounds} <= {4, None}


class Recording(ConfidenceThreshold):
    def reset(self):
        super().reset()
        self.calls = []

    def keep_drafting(self, state):
        go = super().keep_drafting(state)
        self.calls.append((state.drafted, state.draft.top_prob, go))
        return go


@pytest.mark.parametrize("prompt", PROMPTS)
def test_confidence_threshold_rule_and_exactness(prompt):
    policy = Recording(2, 0.2, 6)
    out = run(policy, prompt)
    for drafted, top, go in policy.calls:
        assert go == (top >= 0.2 and drafted < 6)
    assert {go for *_, go in policy.calls} == {True, False}
    assert sum(r.drafted for r in out.rounds) == len(policy.calls)


def test_tune_threshold_picks_the_best():
    assert tune_threshold([0.9, 0.1, 0.5, 0.3], lambda t: -(t - 0.5) ** 2) == 0.5
    assert tune_threshold([0.7, 0.2, 0.4], lambda t: 1.0) == 0.2  # ties -> the smaller threshold
    assert tune_threshold([0.1, 0.2, 0.3], lambda t: math.nan if t == 0.2 else t) == 0.3
    with pytest.raises(ValueError):
        tune_threshold([], lambda t: 1.0)

    # with a real score: modelled speedup of the generation over plain decoding
    cm, scores = costs(), {}

    def speedup(t):
        out = run(ConfidenceThreshold(5, t, 4), PROMPTS[0], n=20)
        scores[t] = out.new_tokens * cm.plain_ms / sum(cm.round_ms(r.exit_layer, r.drafted) for r in out.rounds)
        return scores[t]

    best = tune_threshold([0.0, 0.3, 1.01], speedup)
    assert scores[best] == max(scores.values()) and len(scores) == 3


# ---- DynamicExit ---------------------------------------------------------------------------------
def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    for a in (0.2, 0.7, 0.95):
        for k in (1, 4, 9):
            assert expected_tokens(a, k) == pytest.approx(sum(a**i for i in range(k + 1)))


def test_dynamic_exit_estimates_move_toward_observed_acceptance():
    p = DynamicExit(LAYERS, costs(), 8, prior_accept=0.5, prior_weight=2.0, decay=0.9)
    rounds = []
    assert all(p.acceptance(l) == 0.5 for l in LAYERS)
    rounds.append(record(3, 4, 2))  # 3 drafts tested (the 4th follows a rejection), 2 accepted
    p.choose_exit(state(rounds))
    assert p.acceptance(3) == pytest.approx((2 + 1) / (3 + 2))
    rounds.append(record(3, 4, 4))  # all 4 tested and accepted
    p.choose_exit(state(rounds))
    assert p.acceptance(3) == pytest.approx((0.9 * 2 + 4 + 1) / (0.9 * 3 + 4 + 2))
    # plain steps, budget-capped rounds and layers it does not use are ignored
    for r in (record(None, 0, 0), record(5, 0, 0), record(2, 3, 0)):
        rounds.append(r)
        p.choose_exit(state(rounds))
    assert p.acceptance(1) == p.acceptance(5) == 0.5
    # long runs pull the estimate to the observed rate
    trace = []
    for _ in range(40):
        rounds += [record(5, 6, 6), record(1, 6, 0)]
        p.choose_exit(state(rounds))
        trace.append((p.acceptance(5), p.acceptance(1)))
    assert all(a <= b for (a, _), (b, _) in zip(trace, trace[1:]))
    assert all(a >= b for (_, a), (_, b) in zip(trace, trace[1:]))
    assert p.acceptance(5) > 0.95 and p.acceptance(1) < 0.1
    p.reset()
    assert all(p.acceptance(l) == 0.5 for l in LAYERS)


def test_dynamic_exit_picks_the_best_expected_rate():
    cm = costs(draft=0.1, verify_slope=0.05)
    p = DynamicExit(LAYERS, cm, 8, explore_every=10**6)
    rounds = [record(1, 8, 0)] * 10 + [record(3, 8, 4)] * 3 + [record(5, 8, 8)] * 10
    st = state(rounds)
    for l in LAYERS:  # all explored already
        p._last_chosen[l] = 0
    layer = p.choose_exit(st)
    options = {(None, 0): 1 / cm.plain_ms}
    for l in LAYERS:
        for k in range(1, 9):
            options[(l, k)] = expected_tokens(p.acceptance(l), k) / cm.round_ms(l, k)
    best = max(options, key=options.get)
    assert (layer, p._k) == best == p.plan(st)
    assert layer == 5  # high acceptance there, and drafting is cheap enough
    st.drafted = p._k - 1
    assert p.keep_drafting(st)
    st.drafted = p._k
    assert not p.keep_drafting(st)
    assert p.plan(state(rounds, tokens=99, max_new=100)) == (None, 0)  # budget for one token: no draft
    assert p.plan(state(rounds, tokens=97, max_new=100))[1] <= 2  # drafts capped by the budget


def test_dynamic_exit_explores_stale_layers():
    p = DynamicExit(LAYERS, costs(draft=100.0), 4, explore_every=5)
    rounds, chosen = [], []
    for _ in range(40):
        layer = p.choose_exit(state(rounds))
        chosen.append(layer)
        rounds.append(record(layer, p._k if layer else 0, 0))
    assert chosen[:3] == LAYERS  # every layer tried once first, shallowest first
    for l in LAYERS:
        at = [i for i, c in enumerate(chosen) if c == l]
        assert max(b - a for a, b in zip(at, at[1:])) <= 5 + len(LAYERS)
    assert chosen.count(None) >= 40 - 3 * (1 + 40 // 5)  # everything else is plain: drafts cost 100x
    assert p.explored == 40 - chosen.count(None)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dynamic_exit_expensive_drafts_go_plain(prompt):
    p = DynamicExit(LAYERS, costs(draft=100.0), 8, explore_every=1000)
    out = run(p, prompt)
    assert [r.exit_layer for r in out.rounds[:3]] == LAYERS  # one exploration each
    assert all(r.exit_layer is None and r.drafted == 0 for r in out.rounds[3:])
    p = DynamicExit(LAYERS, costs(draft=100.0), 8)  # default exploration period (32 rounds)
    out = run(p, prompt)
    plain = sum(r.exit_layer is None for r in out.rounds)
    assert plain >= len(out.rounds) - 2 * len(LAYERS) and plain >= 0.8 * len(out.rounds)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dynamic_exit_cheap_drafts_draft_and_learn(prompt):
    cm = costs(draft=0.001, verify_slope=0.0)
    p = DynamicExit(LAYERS, cm, 8)
    out = run(p, prompt)
    assert all(r.drafted >= 1 for r, b in zip(out.rounds, budgets(out)) if b >= 2)
    # its estimates are exactly the decayed counts of the rounds it read (all but the last)
    used = set()
    for l in LAYERS:
        acc = tried = 0.0
        for r in out.rounds[:-1]:
            if r.exit_layer == l:
                acc = 0.9 * acc + r.accepted
                tried = 0.9 * tried + r.accepted + (r.accepted < r.drafted)
        if tried:
            used.add(l)
        assert p.acceptance(l) == pytest.approx((acc + 1.0) / (tried + 2.0))
    assert used == set(LAYERS)


def test_dynamic_exit_bad_arguments():
    with pytest.raises(ValueError, match="not measured"):
        DynamicExit([1, 9], costs(), 4)
    with pytest.raises(ValueError, match="max_len=20"):
        DynamicExit(LAYERS, costs(), 20)
    with pytest.raises(ValueError, match="decay"):
        DynamicExit(LAYERS, costs(), 4, decay=0.0)
    with pytest.raises(ValueError, match="prior_accept"):
        DynamicExit(LAYERS, costs(), 4, prior_accept=1.0)
