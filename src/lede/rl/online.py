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

import numpy as np

from lede.core.costs import CostModel
from lede.core.policy import LOOKUP, DecodeState, Policy
from lede.rl.offline import PolicyError, RLPolicy, greedy_action


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


class PromptCorrection:
    """A full-information policy (``lede.rl.fullinfo``, ``decision: round``) whose predicted accepted drafts are
    rescaled per drafter by what that drafter's rounds delivered on the current prompt: the offline policy is the
    prior, the generation's own rounds the evidence (issue 41, item 3).

    The learner's value of a per-round action a = (drafter d, K) at a round start is v(a) = E[tokens] − ρ · cost(a)
    (tokens = accepted + 1; cost in plain steps at this context, as the cost model prices it), and v(plain) = 1 − ρ
    exactly, so ρ = 1 − Q(plain) and the predicted accepted drafts of a are

        p(a) = Q(a) + ρ · cost(a) − 1                      (K' = K limited by the budget and a lookup's proposal)

    After each round of drafter d the realised accepted drafts are added to R_d and the chosen action's p to P_d;
    the next decision acts greedily on

        Q'(a) = 1 + m_d · p(a) − ρ · cost(a),     m_d = (R_d + κ) / (P_d + κ)          (κ = ``prior_tokens``)

    so a drafter that delivers less than predicted on this prompt is priced down — fewer drafts, another drafter, or
    plain steps where no drafter pays — and one that delivers more is lengthened; with no rounds yet m_d = 1 and the
    policy is the offline one. κ is the prior's weight in accepted tokens. A drafter priced out stays out until the
    next prompt (no exploration: the floor's back-off, ``OnlineFloor``, is the other switch).

    It reads only the rounds already run and the cost model (no model output, no wall clock): in replay
    (``lede.rl.replay``) it acts as in the engine, and greedy output stays identical to plain decoding. The spec
    ``correct:file:PATH`` (``lede.rl.spec``) switches it on."""

    def __init__(self, inner: RLPolicy, costs: CostModel, prior_tokens: float = 4.0):
        if not isinstance(inner, RLPolicy) or inner.pf.decision != "round" or inner.pf.algo != "FullInfo":
            raise PolicyError(f"the per-prompt correction needs a FullInfo policy (one-step values, decision round), "
                              f"not {getattr(inner, 'name', inner)!r}: use floor: for the others")
        if not prior_tokens > 0:
            raise PolicyError(f"prior_tokens={prior_tokens} must be > 0")
        self.inner, self.costs, self.kappa = inner, costs, float(prior_tokens)
        self.name = f"correct({inner.name})"
        self.space = inner.space
        kmax = self.space.max_draft_len
        # per action: its drafter's index (-1: plain) and K
        self._drafter = np.array([-1] + [i for i in range(len(self.space.exit_layers)) for _ in range(kmax)])
        self._valid = self.space.valid_mask(True)  # the round-start actions
        self._state: DecodeState | None = None
        self._draft_len = 0

    def reset(self) -> None:
        self.inner.reset()

    def multipliers(self):
        """m_d per drafter (``space.exit_layers`` order) for the current generation."""
        return (self._real + self.kappa) / (self._pred + self.kappa)

    def _start(self, state: DecodeState) -> None:
        n = len(self.space.exit_layers)
        self._state, self._seen, self._pos = state, 0, state.prompt_len + 1  # the prefill's token is in the cache
        self._real, self._pred = np.zeros(n), np.zeros(n)
        self._pending: tuple[int, float] | None = None  # (drafter index, predicted accepted) of the round under way

    def _observe(self, state: DecodeState) -> None:
        for r in state.rounds[self._seen:]:
            self._pos += r.emitted
            if self._pending is not None and r.exit_layer is not None and r.drafted:
                i, p = self._pending
                self._real[i] += r.accepted
                self._pred[i] += p
            self._pending = None
        self._seen = len(state.rounds)

    def _costs(self, state: DecodeState):
        """cost(a) in plain steps for every action at this round start, K limited as the loop will limit it."""
        space = self.space
        cm = self.costs.at(self._pos)
        room = max(0, min(space.max_draft_len, state.max_new_tokens - len(state.tokens) - 1))
        cost = np.empty(space.size, dtype=np.float64)
        cost[0] = cm.round_ms(None, 0) / cm.plain_ms
        kmax = space.max_draft_len
        for i, d in enumerate(space.exit_layers):
            cap = min(room, len(state.lookup_candidates(room))) if d == LOOKUP else room
            for k in range(1, kmax + 1):
                kk = min(k, cap)
                cost[1 + i * kmax + k - 1] = cm.round_ms(d if kk else None, kk) / cm.plain_ms
        return cost

    def corrected_q(self, state: DecodeState):
        """Q'(a) for every action at this round start (class docstring); also what ``choose_exit`` acts on."""
        q = self.inner.q_values(self.inner.tracker.features(state, True)).astype(np.float64)
        rho = 1.0 - q[0]
        cost = self._costs(state)
        pred = np.maximum(q + rho * cost - 1.0, 0.0)
        m = np.concatenate(([1.0], self.multipliers()))[self._drafter + 1]
        out = 1.0 + m * pred - rho * cost
        out[0] = q[0]
        return out, pred

    def choose_exit(self, state: DecodeState) -> int | None:
        if state is not self._state:
            self._start(state)
        self._observe(state)
        q, pred = self.corrected_q(state)
        action = int(greedy_action(q, self._valid)[0])
        layer, self._draft_len = self.space.round_of(action)
        if layer is not None and self._draft_len:
            self._pending = (int(self._drafter[action]), float(pred[action]))
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self._draft_len
