"""The LEDE decision process: state features, the action encoding and the reward, in one place.

Decisions. At the start of a round the agent picks "plain step" or a drafter from the candidate set
C = (L_1, ..., L_m): an exit layer, or ``LOOKUP`` (0, prompt lookup: ``lede.core.lookup``); after every drafted
token it picks "stop and verify" or "draft one more" (the loop also stops at the maximum draft length and the
token budget). One discrete action space covers both, with disjoint ids (``ActionSpace``):

    0          plain step (no draft this round)        valid at a round start
    1 .. m     draft from C[i-1] (exit layer or lookup) valid at a round start
    m + 1      stop drafting, verify                    valid after a drafted token
    m + 2      draft one more token                     valid after a drafted token

The phase is a state feature, and a learned policy takes the argmax over the valid ids only.

Reward (per decision; w = ``reward_weight``, costs from the measured cost model in units of one plain
step, c_L = draft_ms[L] / plain_ms, v_T = verify_ms[T] / plain_ms, v_1 = 1, all at the round's context when the
cost model measured several: ``CostModel.at``). A round at layer L that drafts
K tokens and gets A of them accepted emits A + 1 tokens for K·c_L + v_{K+1} plain steps, so its return is

    R = (A + 1) − w · (K·c_L + v_{K+1})

With w = 1 the return of a generation is the number of tokens gained over plain decoding in the same time,
and maximising it minimises the time to produce the budget; w < 1 favours tokens per round over time
(ablation). How R is split over the round's decisions is ``credit``:

``at_verify`` (default): the drafts pay their cost and the round's tokens arrive at the stop —
    plain step 1 − w;  choose L / draft one more  − w · c_L;  stop  (A + 1) − w · v_{K+1}.
``per_draft``: each decision is credited, in hindsight, with what it caused —
    plain step                     r = 1 − w                              (one token, one plain step)
    choose L / draft one more      r = [A ≥ j] − w · (c_L + v_{j+1} − v_j)  (the j-th draft: its token if
                                                                           accepted, its draft step and
                                                                           its share of the verification)
    stop, verify                   r = 1 − w                              (the bonus token, as a plain step)

Both sum to R over a round (the undiscounted return is the same); with ``per_draft`` the value of "draft one
more" shows at that decision instead of at the stop. at_verify is the default and per_draft an ablation (measured: ``docs/measurement_log.md``, *Design measurements*).

Discount (``policy.gamma``). Decisions are not time: a round that drafts K tokens takes K + 1 decisions, a
plain step one. With a per-decision discount γ, a round of k decisions delays the value V of the rest of the
generation by k − 1 more decisions than a plain step, which costs (1 − γ^(k−1))·V ≈ (k − 1)·ḡ, ḡ the policy's
mean gain per decision, once the generation is longer than 1/(1 − γ) decisions: a tax on drafting that the
objective (time to the token budget) does not have. γ near 1 removes it (γ = 1 would need a terminal at the
budget's end, see below). With
``policy.discount: round`` (default; ``lede.rl.offline.RoundDiscount``: d3rlpy's transition interval 0 inside a round,
1 at its end) the discount applies per round, which removes the tax on drafting and lets γ (default 0.9) shorten the
horizon in rounds; ``decision`` is the per-decision ablation.

Decisions per round (``policy.decision: round``, ``lede.rl.offline.Experience.per_round``): (drafter, K) chosen together
at the round start, ids 0 and 1 + i·Kmax + (K − 1), learned from the same logged experience; the discount is then
per round, so it does not tax drafting. It is an
ablation: with 57 actions instead of 10 and a third as many transitions it replayed slower.

Episode ends (``lede.rl.offline.Experience.ends``). A generation that stops at EOS (or a stop string) ends the task: its
last decision is terminal. One that stops at the token budget is cut by a time limit that is not in the state:
its last decision is a timeout, and the Q-target bootstraps through it. 

State (``FeatureTracker.features``; cheap, computed inside the loop, names in ``feature_names``):
phase; position and prompt length (scaled); the previous round (plain/layer one-hot, drafted and accepted
as a fraction of the maximum, all-accepted flag); running (EMA) acceptance rate per candidate layer and
EMA of tokens per round; the full model's confidence on the last verified token (max probability,
entropy, top-1/top-2 margin); in a draft: the current layer (one-hot), drafted so far, and the exit
head's confidence for the token just drafted (0 for a lookup draft); copy signals from the recent tokens
(does the last bigram / trigram occur earlier in prompt + output, how many tokens a lookup draft would
propose, and for how many tokens the context has been copying that earlier text, ``copy_run``:
``DecodeState.lookup``, the index the engine's lookup drafter uses). A lookup draft's accepted length keeps growing with the copy run, while the n-gram flags
saturate at 3: hence ``copy_run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lede.core.costs import CostModel, round_costs
from lede.core.lookup import NgramIndex
from lede.core.policy import DecodeState, RoundRecord, drafter_name

PLAIN = 0
COPY_RUN_CAP = 64  # the copy_run feature saturates here (log-scaled)


@dataclass(frozen=True)
class ActionSpace:
    """The discrete actions. ``per_round=False`` (the paper's process, above): a drafter at the round start, then
    stop / one more after every draft. ``per_round=True`` (``policy.decision: round``): one decision per round,
    the drafter *and* its draft length together, ids ``0`` plain and ``1 + i·Kmax + (K − 1)`` for drafter
    ``exit_layers[i]`` and K drafts; the loop then drafts K tokens (fewer where a lookup proposal or the budget
    ends). See ``lede.rl.offline.Experience.per_round`` for why."""

    exit_layers: tuple[int, ...]
    max_draft_len: int
    per_round: bool = False

    @property
    def size(self) -> int:
        if self.per_round:
            return 1 + len(self.exit_layers) * self.max_draft_len
        return len(self.exit_layers) + 3

    @property
    def stop(self) -> int:
        self._token_level()
        return len(self.exit_layers) + 1

    @property
    def more(self) -> int:
        self._token_level()
        return len(self.exit_layers) + 2

    def _token_level(self) -> None:
        if self.per_round:
            raise ValueError("a per-round action space has no stop / draft-one-more actions")

    def _index(self, layer: int) -> int:
        if layer not in self.exit_layers:
            raise ValueError(f"exit layer {layer} is not a candidate ({list(self.exit_layers)})")
        return self.exit_layers.index(layer)

    def start_action(self, layer: int | None) -> int:
        self._token_level()
        return PLAIN if layer is None else 1 + self._index(layer)

    def layer_of(self, action: int) -> int | None:
        if self.per_round:
            return self.round_of(action)[0]
        if action == PLAIN:
            return None
        if 1 <= action <= len(self.exit_layers):
            return self.exit_layers[action - 1]
        raise ValueError(f"action {action} is not a round-start action")

    def round_action(self, layer: int | None, draft_len: int) -> int:
        """Per-round id of (drafter, K); a plain step (``layer`` None or K = 0) is 0."""
        if not self.per_round:
            raise ValueError("round_action needs a per-round action space (ActionSpace(..., per_round=True))")
        if layer is None or draft_len == 0:
            return PLAIN
        if not 1 <= draft_len <= self.max_draft_len:
            raise ValueError(f"draft length {draft_len} is outside 1..{self.max_draft_len}")
        return 1 + self._index(layer) * self.max_draft_len + draft_len - 1

    def round_of(self, action: int) -> tuple[int | None, int]:
        """(drafter or None, K) of a per-round id."""
        if not 0 <= action < self.size:
            raise ValueError(f"action {action} is outside 0..{self.size - 1}")
        if action == PLAIN:
            return None, 0
        i, k = divmod(action - 1, self.max_draft_len)
        return self.exit_layers[i], k + 1

    def valid_mask(self, start_of_round: bool) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        if self.per_round:
            mask[:] = start_of_round  # nothing to decide inside a draft
        elif start_of_round:
            mask[: len(self.exit_layers) + 1] = True
        else:
            mask[[self.stop, self.more]] = True
        return mask

    def valid_masks(self, start_of_round: np.ndarray) -> np.ndarray:
        """``valid_mask`` of each state, [B, A] bool, from its round-start flags [B] bool."""
        return np.stack([self.valid_mask(False), self.valid_mask(True)])[np.asarray(start_of_round, dtype=np.intp)]


def feature_names(space: ActionSpace) -> list[str]:
    names = [drafter_name(l) for l in space.exit_layers]
    return (
        ["phase_start", "position", "log_prompt_len"]
        + ["prev_plain"] + [f"prev_{n}" for n in names]
        + ["prev_drafted", "prev_accepted", "prev_all_accepted"]
        + [f"ema_accept_{n}" for n in names]
        + ["ema_tokens_per_round", "ema_plain_share"]
        + ["verify_top_prob", "verify_entropy", "verify_margin"]
        + [f"cur_{n}" for n in names]
        + ["drafted", "draft_top_prob", "draft_entropy", "draft_margin"]
        + ["copy_bigram", "copy_trigram", "lookup_len", "copy_run"]
    )


class FeatureTracker:
    """Computes the state vector at each decision; keeps running statistics over the rounds of one
    generation (it resets itself when it sees a new generation's state). Incremental: O(1) work per round."""

    def __init__(self, space: ActionSpace, ema: float = 0.8):
        self.space = space
        self.ema = ema
        self.names = feature_names(space)
        self._idx = {l: i for i, l in enumerate(space.exit_layers)}
        self._slots = {k: self.names.index(n) for k, n in (
            ("prev", "prev_plain"), ("prev_drafted", "prev_drafted"), ("ema", f"ema_accept_{drafter_name(space.exit_layers[0])}"),
            ("verify", "verify_top_prob"), ("cur", f"cur_{drafter_name(space.exit_layers[0])}"), ("drafted", "drafted"))}
        self._buf = np.zeros(len(self.names), dtype=np.float32)
        self._state = None
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        m = len(self.space.exit_layers)
        self.prompt = list(prompt_ids)
        self.seen_rounds = 0
        self.accept = np.full(m, 0.5, dtype=np.float32)  # EMA acceptance per layer (prior 0.5)
        self.tokens_per_round = 1.0
        self.plain_share = 0.0

    def _update(self, state: DecodeState) -> None:
        for r in state.rounds[self.seen_rounds:]:
            self._observe(r)
        self.seen_rounds = len(state.rounds)

    def _observe(self, r: RoundRecord) -> None:
        a = self.ema
        self.tokens_per_round = a * self.tokens_per_round + (1 - a) * r.emitted
        self.plain_share = a * self.plain_share + (1 - a) * (r.exit_layer is None)
        if r.exit_layer is not None and r.drafted and r.exit_layer in self._idx:
            i = self._idx[r.exit_layer]
            self.accept[i] = a * self.accept[i] + (1 - a) * (r.accepted / r.drafted)

    def _copy_signals(self, state: DecodeState) -> tuple[float, float, float, float]:
        return copy_signals(state.lookup.sync(state.prompt_ids, state.tokens), self.space.max_draft_len)

    def features(self, state: DecodeState, start_of_round: bool) -> np.ndarray:
        """The state vector [F] (float32, a fresh array), in ``feature_names`` order. Written into a
        preallocated buffer by slot: this runs at every decision inside the decoding loop."""
        if state is not self._state:  # a new generation
            self._state = state
            self.reset(state.prompt_ids)
        self._update(state)
        return self._compose(start_of_round, state.position, state.prompt_len,
                             state.rounds[-1] if state.rounds else None, state.last_verify,
                             None if start_of_round else state, self._copy_signals(state))

    def features_after(self, state: DecodeState, record: RoundRecord, verify, copy: tuple[float, float, float, float]
                       ) -> np.ndarray:
        """The round-start vector the generation of ``state`` (at a round start) would show after one more round
        ``record``: the running statistics updated by it on the side (the tracker itself is unchanged), ``verify``
        the full model's confidence at the new last token and ``copy`` the copy signals of the new context
        (``copy_signals``). ``lede.rl.counterfactual`` asks it for every action at a replayed round start."""
        if state is not self._state:
            self._state = state
            self.reset(state.prompt_ids)
        self._update(state)
        saved = self.accept.copy(), self.tokens_per_round, self.plain_share
        self._observe(record)
        try:
            return self._compose(True, state.position + record.emitted, state.prompt_len, record, verify, None, copy)
        finally:
            self.accept, self.tokens_per_round, self.plain_share = saved

    def _compose(self, start_of_round: bool, position: int, prompt_len: int, last: RoundRecord | None, verify,
                 draft_state: DecodeState | None, copy: tuple[float, float, float, float]) -> np.ndarray:
        m, kmax, o = len(self.space.exit_layers), float(self.space.max_draft_len), self._slots
        x = self._buf
        x.fill(0.0)
        x[0], x[1], x[2] = float(start_of_round), position / 4096.0, math.log1p(prompt_len) / 10.0
        if last is not None:
            x[o["prev"] + (0 if last.exit_layer is None else 1 + self._idx.get(last.exit_layer, 0))] = 1.0
            i = o["prev_drafted"]
            x[i], x[i + 1], x[i + 2] = (last.drafted / kmax, last.accepted / kmax,
                                        float(last.drafted > 0 and last.accepted == last.drafted))
        x[o["ema"] : o["ema"] + m] = self.accept
        x[o["ema"] + m], x[o["ema"] + m + 1] = self.tokens_per_round / kmax, self.plain_share
        if verify is not None:
            i = o["verify"]
            x[i], x[i + 1], x[i + 2] = verify.top_prob, verify.entropy / 10.0, verify.margin
        if draft_state is not None:  # inside a draft
            if draft_state.exit_layer in self._idx:
                x[o["cur"] + self._idx[draft_state.exit_layer]] = 1.0
            d, i = draft_state.draft, o["drafted"]
            x[i] = draft_state.drafted / kmax
            if d is not None:  # None: a lookup draft (no logits)
                x[i + 1], x[i + 2], x[i + 3] = d.top_prob, d.entropy / 10.0, d.margin
        x[-4], x[-3], x[-2], x[-1] = copy
        return x.copy()


def copy_signals(index: NgramIndex, max_draft_len: int) -> tuple[float, float, float, float]:
    """Does the last bigram / trigram of the context (``index``, synced to it) occur earlier, how many tokens would a
    lookup draft propose (as a fraction of the maximum draft length), and how long has the context been copying
    (``NgramIndex.match_run``, log-scaled to 0..1)?"""
    n = index.match_size()
    run = index.match_run(COPY_RUN_CAP)
    return (float(n >= 2), float(n >= 3), len(index.candidates(max_draft_len)) / max_draft_len,
            math.log1p(run) / math.log1p(COPY_RUN_CAP))


CREDITS = ("per_draft", "at_verify")


def decision_rewards(
    actions: list[int], rounds: list[RoundRecord], space: ActionSpace, costs: CostModel, weight: float = 1.0,
    credit: str = "at_verify", prompt_len: int | None = None,
) -> list[float]:
    """Rewards for the decisions of one generation (see the module docstring), given its rounds. With
    ``prompt_len`` each round is priced at its own context (``CostModel.at``: plain steps *there*, so a
    round that pays at 256 tokens of context may not at 2,048); without it, at the cost model's base context.

    A round that drafted K tokens has exactly 1 + K decisions: its round-start action and one decision
    after each draft (K − 1 "more", then "stop" — or a "more" the loop ignored at the maximum draft
    length or the budget)."""
    if credit not in CREDITS:
        raise ValueError(f"unknown reward credit {credit!r}: use one of {', '.join(CREDITS)}")
    at = round_costs(costs, prompt_len, rounds) if prompt_len is not None else [costs] * len(rounds)
    out: list[float] = []
    i = 0
    for r, cm in zip(rounds, at):
        if r.drafted == 0:  # a plain step (or a layer chosen with no budget left to draft)
            out.append(1.0 - weight)
            i += 1
            continue
        plain = cm.plain_ms
        v = {t: ms / plain for t, ms in cm.verify_ms.items()}
        c = cm.draft_ms[r.exit_layer] / plain
        if credit == "per_draft":  # decision j - 1 drafted token j: its token if accepted, its marginal cost
            out += [float(j <= r.accepted) - weight * (c + v[j + 1] - v[j]) for j in range(1, r.drafted + 1)]
            out.append(1.0 - weight * v[1])  # the verification's own token
        else:  # the round-start action and K − 1 "more" each pay one draft; the round's tokens come at the stop
            out += [-weight * c] * r.drafted
            out.append((r.accepted + 1) - weight * v[r.drafted + 1])
        i += 1 + r.drafted
    if i != len(actions):
        raise ValueError(f"{len(actions)} logged decisions but the rounds account for {i}")
    return out
