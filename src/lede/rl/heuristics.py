"""Baseline policies from the literature: adaptive draft length, confidence-threshold stopping and a
DEL-style dynamic exit layer. Each implements the ``Policy`` protocol of ``lede.core.policy``.

    from lede.rl.heuristics import AdaptiveDraftLength, ConfidenceThreshold, DynamicExit, tune_threshold
    Decoder(lm).generate(prompt, AdaptiveDraftLength(exit_layer=8), max_new_tokens=64)
    Decoder(lm).generate(prompt, ConfidenceThreshold(exit_layer=8, threshold=0.6, max_len=8))
    Decoder(lm).generate(prompt, DynamicExit([4, 8, 12], costs, max_len=8))

The policies learn only from ``state.rounds`` (what the loop records after each round): each keeps a
count of the rounds it has already read, so it reads every finished round exactly once, at the next
``choose_exit``. A plain step (``exit_layer`` None, nothing drafted; also a round the loop could not
draft in because of the token budget) carries no information about drafting and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from lede.core.costs import CostModel
from lede.core.policy import DecodeState, RoundRecord


def _new_rounds(state: DecodeState, seen: int) -> tuple[list[RoundRecord], int]:
    """Rounds recorded since the policy last looked (all of them if ``state`` is a new, shorter one)."""
    if len(state.rounds) < seen:
        seen = 0
    return state.rounds[seen:], len(state.rounds)


class AdaptiveDraftLength:
    """Fixed exit layer, draft length K adapted per round (transformers' assisted generation,
    ``num_assistant_tokens_schedule="heuristic"``).

    Rule, applied to the outcome of the previous round (K_0 = ``initial``)::

        K <- min(K + 2, max_len)   if every draft of the round was accepted (accepted == drafted > 0)
        K <- max(K - 1, min_len)   otherwise (some draft rejected)

    Rounds that drafted nothing (budget-capped) leave K unchanged. The round then drafts exactly K
    tokens (``keep_drafting`` is True while drafted < K); the loop may cap it further (token budget,
    ``Decoder.max_draft_len``). K restarts at ``initial`` on ``reset()``.
    """

    def __init__(self, exit_layer: int, initial: int = 4, max_len: int = 16, min_len: int = 1):
        if exit_layer < 1:
            raise ValueError(f"exit_layer={exit_layer} must be >= 1")
        if not 1 <= min_len <= initial <= max_len:
            raise ValueError(f"need 1 <= min_len ({min_len}) <= initial ({initial}) <= max_len ({max_len})")
        self.exit_layer = exit_layer
        self.initial = initial
        self.max_len = max_len
        self.min_len = min_len
        self.name = f"adaptive_L{exit_layer}_K{initial}"
        self.reset()

    def reset(self) -> None:
        self.k = self.initial
        self._seen = 0

    def update(self, record: RoundRecord) -> None:
        """Apply the +2 / -1 rule for one finished round."""
        if record.drafted == 0:
            return
        if record.accepted == record.drafted:
            self.k = min(self.k + 2, self.max_len)
        else:
            self.k = max(self.k - 1, self.min_len)

    def choose_exit(self, state: DecodeState) -> int | None:
        new, self._seen = _new_rounds(state, self._seen)
        for record in new:
            self.update(record)
        return self.exit_layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self.k


class ConfidenceThreshold:
    """Fixed exit layer; keep drafting while the exit head is confident (DISCO / AdaEDL style).

    After drafting token d_k with exit-head distribution q_k, draft another iff::

        max_v q_k(v) >= threshold   and   k < max_len

    So ``threshold <= 0`` always drafts ``max_len`` tokens and ``threshold > 1`` drafts exactly one (the
    policy is asked only after a token has been drafted). Tune ``threshold`` with ``tune_threshold``.
    """

    def __init__(self, exit_layer: int, threshold: float, max_len: int):
        if exit_layer < 1:
            raise ValueError(f"exit_layer={exit_layer} must be >= 1")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        self.exit_layer = exit_layer
        self.threshold = threshold
        self.max_len = max_len
        self.name = f"confidence_L{exit_layer}_t{threshold:g}_K{max_len}"

    def reset(self) -> None:
        pass

    def choose_exit(self, state: DecodeState) -> int | None:
        return self.exit_layer

    def keep_drafting(self, state: DecodeState) -> bool:
        if state.drafted >= self.max_len:
            return False
        return state.draft is not None and state.draft.top_prob >= self.threshold


def tune_threshold(candidates: Iterable[float], evaluate: Callable[[float], float]) -> float:
    """The candidate with the highest ``evaluate(threshold)`` (e.g. replayed speedup on training data);
    ties go to the smaller threshold. NaN scores never win."""
    best: float | None = None
    best_score = -math.inf
    for t in sorted(set(candidates)):
        score = evaluate(t)
        if not math.isnan(score) and (best is None or score > best_score):
            best, best_score = t, score
    if best is None:
        raise ValueError("tune_threshold: no candidate thresholds (or every score was NaN)")
    return best


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens emitted by a round of k drafts when each draft is accepted independently with
    probability alpha (until the first rejection): sum_{i=0..k} alpha^i = (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0 - 1e-12:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class DynamicExit:
    """Per-round choice of exit layer and draft length from running acceptance estimates (DEL-style).

    **Estimate.** Per exit layer L, a per-token acceptance rate alpha_L under the i.i.d. model (each
    draft accepted with probability alpha_L until the first rejection). A round that drafted K and
    accepted A tested A + [A < K] drafts (the drafts after the first rejection are never tested, so
    counting them as rejections would bias alpha down), of which A succeeded. With exponentially
    decayed counts and a Beta prior of mean ``prior_accept`` and weight ``prior_weight``::

        acc_L <- decay * acc_L + A,   tried_L <- decay * tried_L + A + [A < K]
        alpha_L = (acc_L + prior_accept * prior_weight) / (tried_L + prior_weight)

    **Decision.** With E_K(alpha) = (1 - alpha^(K+1)) / (1 - alpha) expected tokens per round, pick

        (L, K) = argmax_{L, 1 <= K <= K_max}  E_K(alpha_L) / costs.round_ms(L, K)   (at the round's context)

    (K_max = min(max_len, remaining budget - 1)) and draft exactly K from L if that rate beats plain
    decoding's 1 / costs.plain_ms; otherwise take a plain step (None).

    **Exploration.** A layer not chosen in the last ``explore_every`` rounds (or never, in this
    generation) is chosen once, with its best K, before any exploitation (optimism), so that an
    estimate that looks bad is re-checked instead of frozen. All state is reset by ``reset()``.
    """

    def __init__(
        self,
        exit_layers: Iterable[int],
        costs: CostModel,
        max_len: int,
        prior_accept: float = 0.5,
        prior_weight: float = 2.0,
        decay: float = 0.9,
        explore_every: int = 32,
        plain_head: bool = False,
    ):
        self.exit_layers = sorted(set(exit_layers))
        if not self.exit_layers or self.exit_layers[0] < 1:
            raise ValueError(f"exit_layers={self.exit_layers} must be non-empty, each >= 1")
        draft_ms = costs.draft_plain_ms if plain_head else costs.draft_ms
        missing = [l for l in self.exit_layers if l not in draft_ms]
        if missing:
            raise ValueError(
                f"exit layers {missing} were not measured by the cost model (measured: {sorted(draft_ms)})"
            )
        if max_len < 1 or any(t not in costs.verify_ms for t in range(1, max_len + 2)):
            raise ValueError(f"max_len={max_len}: need >= 1 and verify_ms measured for 1..{max_len + 1} tokens")
        if not 0 < prior_accept < 1 or prior_weight <= 0:
            raise ValueError(f"need 0 < prior_accept ({prior_accept}) < 1 and prior_weight ({prior_weight}) > 0")
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay} must be in (0, 1]")
        if explore_every < 1:
            raise ValueError(f"explore_every={explore_every} must be >= 1")
        self.costs = costs
        self.max_len = max_len
        self.prior_accept = prior_accept
        self.prior_weight = prior_weight
        self.decay = decay
        self.explore_every = explore_every
        self.plain_head = plain_head
        self.name = "dynamic_exit"
        self.reset()

    def reset(self) -> None:
        self._acc = {l: 0.0 for l in self.exit_layers}
        self._tried = {l: 0.0 for l in self.exit_layers}
        self._last_chosen: dict[int, int] = {}  # layer -> round index
        self._seen = 0
        self._k = 0
        self.explored = 0  # rounds chosen by exploration, this generation

    # ---- estimates ------------------------------------------------------------------------------
    def update(self, record: RoundRecord) -> None:
        """Fold one finished round into its layer's counts (plain steps and unknown layers ignored)."""
        layer = record.exit_layer
        if layer is None or record.drafted == 0 or layer not in self._acc:
            return
        tested = record.accepted + (1 if record.accepted < record.drafted else 0)
        self._acc[layer] = self.decay * self._acc[layer] + record.accepted
        self._tried[layer] = self.decay * self._tried[layer] + tested

    def acceptance(self, layer: int) -> float:
        """The current estimate alpha_L."""
        w = self.prior_weight
        return (self._acc[layer] + self.prior_accept * w) / (self._tried[layer] + w)

    def _rate(self, layer: int, k: int, costs: CostModel) -> float:
        """Expected tokens per ms of a round drafting k from layer (``costs``: at the round's context)."""
        return expected_tokens(self.acceptance(layer), k) / costs.round_ms(layer, k, self.plain_head)

    def _best_k(self, layer: int, k_max: int, costs: CostModel) -> tuple[int, float]:
        best_k, best = 1, -math.inf
        for k in range(1, k_max + 1):
            r = self._rate(layer, k, costs)
            if r > best:
                best_k, best = k, r
        return best_k, best

    def plan(self, state: DecodeState) -> tuple[int | None, int]:
        """(exit layer or None, draft length) by expected tokens per ms, without exploration."""
        k_max = min(self.max_len, state.max_new_tokens - len(state.tokens) - 1)
        costs = self.costs.at(state.position)
        best: tuple[int | None, int] = (None, 0)
        best_rate = 1.0 / costs.plain_ms
        if k_max < 1:
            return best
        for layer in self.exit_layers:
            k, r = self._best_k(layer, k_max, costs)
            if r > best_rate:
                best, best_rate = (layer, k), r
        return best

    # ---- the policy -----------------------------------------------------------------------------
    def choose_exit(self, state: DecodeState) -> int | None:
        new, self._seen = _new_rounds(state, self._seen)
        for record in new:
            self.update(record)
        now = len(state.rounds)
        k_max = min(self.max_len, state.max_new_tokens - len(state.tokens) - 1)
        stale = [l for l in self.exit_layers if now - self._last_chosen.get(l, -math.inf) > self.explore_every]
        if stale and k_max >= 1:
            layer = min(stale, key=lambda l: self._last_chosen.get(l, -math.inf))  # least recently tried
            self._k = self._best_k(layer, k_max, self.costs.at(state.position))[0]
            self.explored += 1
        else:
            layer, self._k = self.plan(state)
        if layer is not None:
            self._last_chosen[layer] = now
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self._k
