"""An online floor under any policy: during a generation, suspend a drafter whose rounds are losing time against
plain decoding, and probe it again after a back-off.

    from lede.rl.online import OnlineFloor
    policy = OnlineFloor(RLPolicy.load("results/rl/policy_FullInfo_s0.pt"), costs)   # or the spec floor:file:PATH
    decoder.generate(ids, policy, max_new_tokens=128)

Why. An offline policy is a prior over states it saw in training; on a prompt unlike them (measured: short factual
questions, where prompt lookup finds nothing to copy) it can keep choosing a drafter whose drafts are rejected, each
such round costing more than the one token it yields. Plain decoding gains 0 tokens over itself per step; a round
of drafter d that emits A + 1 tokens in T plain steps gains g = (A + 1) − T (T from the cost model at the round's
context, as in ``lede.rl.features``: the reward with w = 1). The floor keeps, per drafter and per generation, the
gains of its last ``window`` rounds; when their mean is negative the drafter is suspended for ``backoff`` rounds (a
plain step instead whenever the policy picks it), and each further losing judgement doubles the back-off (up to
``max_backoff``); a winning one resets it. A suspended drafter costs the rounds it would have lost; a drafter that
wins is never touched, so on prompts where the policy is right the floor changes nothing.

It reads only the rounds the generation already ran (no model output, no wall clock): in replay
(``lede.rl.replay``) it acts exactly as in the engine, and greedy output stays identical to plain decoding.
Unlike the per-prompt bandits of BanditSpec or TapOut, it corrects an offline context policy instead of replacing it:
``policy.online`` switches it on as an ablation (the ``floor:`` policy spec, ``lede.rl.spec``).
"""

from __future__ import annotations

from collections import deque

from lede.core.costs import CostModel
from lede.core.policy import DecodeState, Policy


class OnlineFloor:
    """``inner`` with drafters suspended while they lose against plain decoding (module docstring)."""

    def __init__(self, inner: Policy, costs: CostModel, window: int = 4, backoff: int = 4, max_backoff: int = 64):
        if window < 1 or backoff < 1 or max_backoff < backoff:
            raise ValueError(f"online floor: window={window}, backoff={backoff}, max_backoff={max_backoff} must be "
                             ">= 1 with max_backoff >= backoff")
        self.inner, self.costs = inner, costs
        self.window, self.backoff, self.max_backoff = window, backoff, max_backoff
        self.name = f"floor({inner.name})"
        self.overrides = 0  # rounds turned into plain steps, over the policy's life (for reports)
        self._state: DecodeState | None = None
        self._override = False

    def reset(self) -> None:
        self.inner.reset()

    def _start(self, state: DecodeState) -> None:
        self._state, self._seen, self._pos = state, 0, state.prompt_len + 1  # the prefill's token is in the cache
        self._gains: dict[int, deque] = {}
        self._until: dict[int, int] = {}  # drafter -> first round index it may draft again
        self._wait: dict[int, int] = {}  # drafter -> its next back-off

    def _observe(self, state: DecodeState) -> None:
        for r in state.rounds[self._seen:]:
            cm = self.costs.at(self._pos)
            self._pos += r.emitted
            if r.exit_layer is None or not r.drafted:
                continue
            d = r.exit_layer
            gains = self._gains.setdefault(d, deque(maxlen=self.window))
            gains.append(r.emitted - cm.round_ms(d, r.drafted) / cm.plain_ms)
            if len(gains) == self.window:  # judge the drafter on its last `window` rounds
                if sum(gains) < 0:
                    wait = self._wait.get(d, self.backoff)
                    self._until[d] = len(state.rounds) + wait
                    self._wait[d] = min(2 * wait, self.max_backoff)
                    gains.clear()
                else:
                    self._wait[d] = self.backoff
        self._seen = len(state.rounds)

    def suspended(self, layer: int) -> bool:
        """Is ``layer`` suspended at this round of the current generation?"""
        return self._state is not None and len(self._state.rounds) < self._until.get(layer, 0)

    def choose_exit(self, state: DecodeState) -> int | None:
        if state is not self._state:
            self._start(state)
        self._observe(state)
        layer = self.inner.choose_exit(state)  # always asked: its own trackers stay in step with the rounds
        self._override = layer is not None and self.suspended(layer)
        if self._override:
            self.overrides += 1
            return None
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return self.inner.keep_drafting(state)
