"""The one draft → verify → accept round, shared by every decoder of the project.

The engine (``lede.core.engine.Decoder``: model forwards), the teacher-forced replay (``lede.rl.replay``:
precomputed tables) and the static replay of the exit report (``lede.drafters.distill.replay_static``: accepted-run
lengths) all call :func:`run_round` and :func:`emit`; they differ only in where a draft and a verdict come from,
a :class:`RoundSource`. So the policy sees the same decisions in the same order everywhere, and the three cannot
drift apart.

One round, with K the number of drafts and A the accepted ones:

    layer = policy.choose_exit(state)              # None: a plain step; LOOKUP: copy from the context
    while layer is not None and K < min(max_draft_len, budget - 1):
        d_K = source.draft(...)                    # exit head at L, or the next lookup candidate
        if not policy.keep_drafting(state): break
    A, emitted = source.verify(pending, d_1..d_K)  # greedy: A = leading drafts equal to the full model's argmax
                                                   # emitted = d_1..d_A + the full model's token at position A

(``budget - 1``: the round's own bonus token must fit the budget.) Greedy acceptance is
:func:`accepted_prefix`; the engine's sampling rule (Leviathan et al.) lives in the engine's source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lede.core.policy import LOOKUP, DecodeState, Policy, RoundRecord


@dataclass
class Draft:
    """One drafted token and the drafter's confidence in it (None for a lookup copy); ``exact``: False where a
    replay cannot know what the engine would have seen (a draft after a wrong one)."""

    token: int
    confidence: object = None
    exact: bool = True


@dataclass
class Verdict:
    """What verification decided: ``accepted`` leading drafts, the ``emitted`` tokens (accepted drafts + the full
    model's next token) and the full model's confidence at the last accepted position."""

    accepted: int
    emitted: list[int]
    last_verify: object


@dataclass
class RoundOutcome:
    """The round's emitted tokens and, per policy decision in order, whether its state was exact."""

    emitted: list[int]
    exact: list[bool] = field(default_factory=list)


class RoundSource(Protocol):
    """Where one decoder's drafts and verdicts come from."""

    def begin(self, state: DecodeState, layer: int | None) -> None:
        """A round starts with drafter ``layer`` (None: plain step): check it, reset per-round bookkeeping."""

    def draft(self, state: DecodeState, layer: int, copied: int | None) -> Draft:
        """The next draft at ``layer`` (``copied``: the lookup candidate, for ``LOOKUP``)."""

    def verify(self, state: DecodeState, layer: int | None, drafts: list[int]) -> Verdict:
        """Verify the pending token + ``drafts`` (``layer`` None when nothing was drafted)."""


def no_clock() -> float:
    """The clock of a replay: replayed rounds take no wall time (the cost model prices them)."""
    return 0.0


def accepted_prefix(target: torch.Tensor, drafts: Sequence[int]) -> int:
    """Greedy acceptance: how many leading drafts equal the full model's argmax ``target`` [K+1] at their position."""
    k = len(drafts)
    if not k:
        return 0
    match = target[:k] == torch.tensor(list(drafts), device=target.device)  # [K]
    return int(match.cumprod(0).sum())


def run_round(state: DecodeState, policy: Policy, source: RoundSource, max_draft_len: int,
              clock: Callable[[], float] = time.perf_counter) -> RoundOutcome:
    """One draft → verify round on ``state`` (appends its ``RoundRecord``; does not append the emitted tokens:
    :func:`emit` does). ``clock`` times the policy, drafting and verification (a replay passes :func:`no_clock`)."""
    budget = state.max_new_tokens - len(state.tokens)  # tokens we may still emit
    t = clock()
    layer = policy.choose_exit(state)
    t2 = clock()
    copied = state.lookup_candidates(max_draft_len) if layer == LOOKUP else None  # [<= Kmax] token ids
    policy_s, draft_s = t2 - t, clock() - t2
    source.begin(state, layer)
    state.exit_layer, state.drafted, state.draft, state.draft_tokens = layer, 0, None, []

    drafts: list[int] = []
    exact = [True]  # the choose_exit decision saw the engine's state
    while layer is not None and len(drafts) < min(max_draft_len, budget - 1):
        if copied is not None and len(drafts) == len(copied):
            break  # the lookup match has no more tokens
        t = clock()
        d = source.draft(state, layer, copied[len(drafts)] if copied is not None else None)
        drafts.append(d.token)
        state.drafted, state.draft, state.draft_tokens = len(drafts), d.confidence, drafts
        exact.append(d.exact)
        t2 = clock()
        go_on = policy.keep_drafting(state)
        t3 = clock()
        draft_s, policy_s = draft_s + (t2 - t), policy_s + (t3 - t2)
        if not go_on:
            break

    t = clock()
    verdict = source.verify(state, layer if drafts else None, drafts)
    verify_s = clock() - t
    state.last_verify = verdict.last_verify
    state.rounds.append(RoundRecord(layer if drafts else None, len(drafts), verdict.accepted, draft_s, verify_s,
                                    policy_s))
    return RoundOutcome(verdict.emitted, exact)


def emit(state: DecodeState, tokens: Sequence[int], eos: Collection[int]) -> str | None:
    """Append a round's ``tokens`` to ``state.tokens``, truncated at the budget and after the first of ``eos``;
    returns "eos" when one was emitted, else None."""
    for tok in tokens:
        if len(state.tokens) >= state.max_new_tokens:
            break
        state.tokens.append(tok)
        if tok in eos:
            return "eos"
    return None
