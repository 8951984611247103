"""The online floor (lede.rl.online): drafters suspended while they lose against plain decoding; exact output."""

from __future__ import annotations

import pytest

from lede import Autoregressive, Decoder, Static
from lede.core.policy import DecodeState, RoundRecord
from lede.rl.online import OnlineFloor
from lede.rl.replay import replay_speed
from lede.rl.spec import PolicyContext, PolicySpec, PolicySpecError
from test_fullinfo import KMAX, setup  # noqa: F401  (the module-scoped fixture)
from test_replay import COSTS


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
