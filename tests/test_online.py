"""lede.rl.online: the online floor (drafters suspended while they lose against plain decoding) and the per-prompt
correction of a FullInfo policy; both keep the output exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lede import Autoregressive, Decoder, Static
from lede.core.policy import LOOKUP, DecodeState, RoundRecord
from lede.rl.features import ActionSpace, feature_names
from lede.rl.offline import PolicyError, PolicyFile, RLPolicy, _mlp
from lede.rl.online import OnlineFloor, PromptCorrection
from lede.rl.replay import replay_speed
from lede.rl.spec import PolicyContext, PolicySpec, PolicySpecError
from test_fullinfo import KMAX, setup  # noqa: F401  (the module-scoped fixture)
from test_replay import COSTS, DRAFTERS


class Always:
    """Drafts K from ``layer`` every round."""

    def __init__(self, layer: int, k: int):
        self.layer, self.k, self.name = layer, k, f"always_{layer}_{k}"

    def reset(self) -> None:
        pass

    def choose_exit(self, state):
        return self.layer

    def keep_drafting(self, state) -> bool:
        return state.drafted < self.k


def run(floor: OnlineFloor, accepted_per_round: list[int], k: int = 4) -> list[int | None]:
    """Feed the floor a generation whose drafting rounds accept the given counts; returns its choices."""
    state = DecodeState(6, 8, 1000, tokens=[1])
    choices, it = [], iter(accepted_per_round)
    while True:
        layer = floor.choose_exit(state)
        choices.append(layer)
        if layer is None:
            state.rounds.append(RoundRecord(None, 0, 0, 0.0, 0.0, 0.0))
        else:
            try:
                a = next(it)
            except StopIteration:
                return choices
            state.rounds.append(RoundRecord(layer, k, a, 0.0, 0.0, 0.0))
        state.tokens += [1] * state.rounds[-1].emitted
        if len(choices) > 200:
            return choices


def test_losing_drafter_is_suspended_with_doubling_backoff():
    """Rounds of K = 4 at layer 3 cost 4·0.31 + 1.2 = 2.44 plain steps: accepting 0 (1 token) loses, accepting 3
    (4 tokens) wins. After `window` losing rounds the drafter is suspended for `backoff` rounds, then 2·backoff."""
    floor = OnlineFloor(Always(3, 4), COSTS, window=2, backoff=3, max_backoff=6)
    choices = run(floor, [0, 0, 0, 0, 0, 0, 0, 0])
    assert choices[:2] == [3, 3]
    assert choices[2:5] == [None] * 3  # suspended for 3 rounds
    assert choices[5:7] == [3, 3] and choices[7:13] == [None] * 6  # judged again: 6 rounds
    assert choices[13:15] == [3, 3] and choices[15:21] == [None] * 6  # capped at max_backoff
    assert floor.overrides == choices.count(None) == 3 + 6 + 6 + 6


def test_winning_drafter_is_never_touched():
    floor = OnlineFloor(Always(3, 4), COSTS, window=2, backoff=3)
    assert run(floor, [3, 3, 2, 3, 3, 3, 3, 3]) == [3] * 9 and floor.overrides == 0
    # one losing round inside a winning window does not suspend; a window of losses does
    floor = OnlineFloor(Always(3, 4), COSTS, window=2, backoff=3)
    assert run(floor, [3, 0, 3, 0, 0, 3])[:6] == [3, 3, 3, 3, 3, None]


def test_floor_is_exact_and_never_slower_on_a_losing_static(setup):  # noqa: F811
    """On the tiny random model an exit draft is mostly rejected: under the floor, replay prices the generations at
    most as the static cell alone (fewer drafting rounds), and the engine's output is plain decoding's."""
    lm, dec, seqs, replay = setup
    prompts = [s.prompt_ids for s in seqs]
    raw = replay_speed(replay, prompts, Static(1, 4), COSTS, 40)
    floored = replay_speed(replay, prompts, OnlineFloor(Static(1, 4), COSTS), COSTS, 40)
    assert raw.aggregate < 1.0  # the static cell loses here...
    assert floored.drafted < raw.drafted and floored.aggregate > raw.aggregate  # ...and the floor cuts the loss
    engine = Decoder(lm, exit_heads=dec.exit_heads, max_draft_len=KMAX)
    for ids in prompts:
        want = engine.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
        assert engine.generate(ids, OnlineFloor(Static(1, 4), COSTS, window=2), max_new_tokens=30).token_ids == want


def test_floor_spec():
    ctx = PolicyContext(num_layers=6, max_draft_len=KMAX, costs=COSTS)
    pol = PolicySpec.parse("floor:lookup:3").build(ctx)
    assert isinstance(pol, OnlineFloor) and pol.name == "floor(static_lookup_K3)"
    with pytest.raises(PolicySpecError, match="cost model"):
        PolicySpec.parse("floor:3:2").build(PolicyContext(num_layers=6))
    for bad in ("floor:", "floor:plain", "floor:floor:3:2", "floor:9:x"):
        with pytest.raises(PolicySpecError):
            PolicySpec.parse(bad)


# ---- the per-prompt correction (PromptCorrection) -----------------------------------------------------------------

def constant_fullinfo(predicted: dict, k_max: int = 4, rho: float = 1.0) -> RLPolicy:
    """A FullInfo policy whose Q is the same in every state: plain 1 − ρ; (d, K) for d in ``predicted``
    1 + predicted[d](K) − ρ · cost(d, K) at the cost model's base context; every other action −10."""
    space = ActionSpace(DRAFTERS, k_max, per_round=True)
    cm = COSTS.at(8)
    q = np.full(space.size, -10.0, dtype=np.float32)
    q[0] = 1.0 - rho
    for d, accepted in predicted.items():
        for k in range(1, k_max + 1):
            q[space.round_action(d, k)] = 1.0 + accepted(k) - rho * cm.round_ms(d, k) / cm.plain_ms
    n = len(feature_names(space))
    net = _mlp([n, 4, space.size])
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        net[-1].bias.copy_(torch.from_numpy(q))
    return RLPolicy(PolicyFile(model="tiny-llama-s0", exit_layers=list(DRAFTERS), max_draft_len=k_max,
                               features=feature_names(space), mean=[0.0] * n, std=[1.0] * n, algo="FullInfo", seed=0,
                               q_net=net, decision="round"))


def test_correction_starts_as_the_prior_and_prices_out_a_drafter_that_fails_on_this_prompt():
    """Predicted: layer 3 accepts every draft (the prior drafts K = 4). It accepts none here: after the first round
    m = κ / (κ + 4) = 0.5 and K = 4 still pays (1 + 2 − 2.44 > 0); after the second m = 1/3, every (3, K) is worth
    less than a plain step (1 + K/3 < cost(3, K)), so the rest of the generation decodes plainly."""
    inner = constant_fullinfo({3: lambda k: k})
    corr = PromptCorrection(inner, COSTS, prior_tokens=4.0)
    choices = run(corr, [0] * 10)
    assert choices[:2] == [3, 3] and set(choices[2:]) == {None} and len(choices) > 10
    assert corr.multipliers()[DRAFTERS.index(3)] == pytest.approx(4.0 / (4.0 + 8.0))
    # a drafter that delivers what was predicted is left as the prior chose it
    corr = PromptCorrection(constant_fullinfo({3: lambda k: k}), COSTS)
    assert run(corr, [4] * 8) == [3] * 9 and corr.multipliers()[DRAFTERS.index(3)] == pytest.approx(1.0)
    # the correction is per drafter: layer 3 failing moves the policy to lookup, predicted a little lower
    # (lookup: 1 + 0.3·4 − 1.19 = 1.01 at K = 4, below layer 3's 2.56 until layer 3 has failed once: 0.56)
    corr = PromptCorrection(constant_fullinfo({3: lambda k: k, LOOKUP: lambda k: 0.3 * k}), COSTS)
    cycle = [5, 6, 7] * 40  # a repetitive text: lookup always has a proposal
    state = DecodeState(6, 9, 1000, tokens=cycle[:1], prompt_ids=cycle[1:10])
    picks = []
    for _ in range(4):
        layer = corr.choose_exit(state)
        picks.append(layer)
        state.rounds.append(RoundRecord(layer, 4, 0 if layer == 3 else 4, 0.0, 0.0, 0.0))
        state.tokens = cycle[: len(state.tokens) + state.rounds[-1].emitted]
    assert picks == [3, LOOKUP, LOOKUP, LOOKUP]


def test_correction_is_exact_in_the_engine_and_its_spec(setup, tmp_path):  # noqa: F811
    lm, dec, seqs, replay = setup
    from lede.rl.fullinfo import train_full_information

    prompts = [s.prompt_ids for s in seqs if s.continuation]
    res = train_full_information(replay, prompts, [Static(LOOKUP, 2), Static(1, 1), Autoregressive()],
                                 ActionSpace(DRAFTERS, KMAX), COSTS, lm.name, rate_iterations=0, epochs=3,
                                 max_new_tokens=30)
    res.policy.save(tmp_path / "fi.pt")
    engine = Decoder(lm, exit_heads=dec.exit_heads, max_draft_len=KMAX)
    ctx = PolicyContext(num_layers=6, max_draft_len=KMAX, lm_name=lm.name, exit_layers=list(DRAFTERS), costs=COSTS)
    corr = PolicySpec.parse(f"correct:file:{tmp_path / 'fi.pt'}").build(ctx)
    assert isinstance(corr, PromptCorrection) and corr.name == "correct(lede_FullInfo_s0)"
    for ids in prompts:
        want = engine.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
        assert engine.generate(ids, corr, max_new_tokens=30).token_ids == want
    with pytest.raises(PolicySpecError, match="cost model"):
        PolicySpec.parse(f"correct:file:{tmp_path / 'fi.pt'}").build(PolicyContext(num_layers=6))
    for bad in ("correct:", "correct:lookup:3", "correct:floor:file:x.pt"):
        with pytest.raises(PolicySpecError, match="correct:file:PATH"):
            PolicySpec.parse(bad)
    with pytest.raises(PolicyError, match="FullInfo"):
        PromptCorrection(Static(1, 2), COSTS)
