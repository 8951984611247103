"""A round-level LEDE policy fitted to full-information targets: every action's outcome, from teacher-forced replay.

    from lede.rl.fullinfo import train_full_information
    res = train_full_information(replay_decoder, train_prompts, behaviours, space, costs, model="smollm2-135m")
    res.policy.save("policy_FullInfo_s0.pt")       # a PolicyFile(decision="round"): RLPolicy runs it unchanged
    RLPolicy(res.policy)                            # in the engine, in replay, in lm-eval

Why. The d3rlpy learners (``lede.rl.offline``) see, in each logged state, the one action the behaviour policy took, and
must bootstrap the rest through Q-learning. For greedy decoding the replay (``lede.rl.replay``) knows more: at a round
start after n emitted tokens of a stored greedy continuation c, drafter d's accepted run is the number of leading
rows where its draft equals c (an exit head's argmax along the teacher-forced pass, or the lookup proposal of the
current context), so the outcome of *every* (drafter, K) there is known exactly — the information the hindsight
oracle uses. This module turns it into a supervised problem: at each visited round start, the value of every
per-round action (``ActionSpace(per_round=True)``: plain, or drafter d with K drafts)

    v(plain)  = 1 − ρ
    v(d, K)   = (min(A_d, K') + 1) − ρ · (K'·c_d + v_{K'+1})        K' = min(K, budget left − 1, lookup proposal)

(c, v: the cost model's draft and verification times at this round's context, in plain steps; ``CostModel.at``),
and a small MLP fitted by least squares to the whole vector predicts its expectation from the round-start features
(``lede.rl.features``). Acting greedily on it maximises expected tokens − ρ · time per round. Why that is the right
round objective: a generation's time to its token budget is minimal when the long-run rate tokens / time is maximal,
and for a rate g* the optimal policy maximises tokens − g* · time per round up to the value of the next state
(average-reward dynamic programming; Dinkelbach's method for ratio objectives). The round-start features predict
little about the value of the next state beyond the round's own outcome, so the greedy round is taken, with ρ
updated to the fitted policy's own replayed rate on the training sequences (``rate_iterations``).

States. The features depend on the history (the previous round, running acceptance rates), hence on the policy
being run: the first fit sees the round starts of the behaviour policies; each later iteration replays the current
fitted policy (with ``epsilon`` random rounds) and refits on all states seen so far (DAgger, Ross et al., 2011).

Measured (``python -m lede.rl.learner_validation --setting FullInfo --seeds 0 1 2``: fitted on the dev split's first 8
prompts per category, replayed along its other 24 sequences; static lookup K3 1.349×, the oracle 1.780× there):
1.367× / 1.344× / 1.375× for three seeds, where DoubleDQN (γ 0.9 per round, the d3rlpy default of this study) gave
1.268× / 1.333×; 128 × 128 units and 60 epochs 1.391×, four refits 1.378×, 32 × 32 1.365×, no refit (ρ = 1)
1.347×. A fit takes seconds (~33k round starts; the replay tables ~2 min once).

Limits. Greedy decoding only (the replay is teacher-forced), and the drafts' own confidence is not a round-start
feature: the policy decides K at the round start (``decision: round``), without the stop / one-more decisions.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from lede.core.costs import CostModel
from lede.rl.features import ActionSpace, FeatureTracker, feature_names
from lede.core.policy import LOOKUP, DecodeState, Policy
from lede.rl.replay import ReplayDecoder, replay_speed
from lede.rl.offline import PolicyError, PolicyFile, RLPolicy, _mlp

log = logging.getLogger(__name__)
ALGO = "FullInfo"


@dataclass
class RoundOutcomes:
    """Every per-round action's outcome at one round start: v(a) = tokens[a] − ρ · cost[a]."""

    tokens: np.ndarray  # [A] tokens the round would emit (accepted + 1)
    cost: np.ndarray  # [A] its time in plain steps at this context
    drafted: np.ndarray  # [A] drafts the round would make (K limited by the budget and a lookup proposal)


def round_outcomes(dec: ReplayDecoder, state: DecodeState, space: ActionSpace, costs: CostModel) -> RoundOutcomes:
    """The outcome of every per-round action of ``space`` (``per_round=True``) at this round start of a replayed
    generation (module docstring): drafter d's accepted run is the number of leading drafts equal to the stored
    continuation, its drafts limited by the budget (and a lookup's by its proposal), as ``ReplayDecoder`` drafts."""
    table = dec.tables[tuple(state.prompt_ids)]
    c, n, kmax = table.continuation, len(state.tokens), space.max_draft_len
    room = max(0, min(kmax, min(state.max_new_tokens, len(c)) - n - 1))  # drafts the loop allows this round
    cm = costs.at(state.prompt_len + n)
    tokens = np.ones(space.size, dtype=np.float32)
    cost = np.empty(space.size, dtype=np.float32)
    drafted = np.zeros(space.size, dtype=np.int64)
    cost[0] = cm.round_ms(None, 0) / cm.plain_ms
    for i, d in enumerate(space.exit_layers):
        drafts = state.lookup_candidates(room) if d == LOOKUP else table.draft_token[d][n : n + room]
        a = 0
        while a < len(drafts) and drafts[a] == c[n + a]:
            a += 1
        for k in range(1, kmax + 1):
            kk = min(k, len(drafts))
            tokens[1 + i * kmax + k - 1] = min(a, kk) + 1
            cost[1 + i * kmax + k - 1] = cm.round_ms(d if kk else None, kk) / cm.plain_ms
            drafted[1 + i * kmax + k - 1] = kk
    return RoundOutcomes(tokens, cost, drafted)


class RoundStartProbe:
    """A policy that runs ``inner`` in replay and calls ``record(state)`` at each of its round starts, before
    ``inner`` chooses (``self.tracker`` has seen every earlier round). Subclasses say what to record."""

    kind = "probe"

    def __init__(self, inner: Policy, dec: ReplayDecoder, space: ActionSpace, costs: CostModel):
        self.inner, self.dec, self.space, self.costs = inner, dec, space, costs
        self.name = f"{self.kind}({inner.name})"
        self.tracker = FeatureTracker(space)

    def record(self, state: DecodeState) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.inner.reset()

    def choose_exit(self, state: DecodeState) -> int | None:
        self.record(state)
        return self.inner.choose_exit(state)

    def keep_drafting(self, state: DecodeState) -> bool:
        return self.inner.keep_drafting(state)


class _Probe(RoundStartProbe):
    """Records, at each round start of ``inner``, the features and ``round_outcomes``."""

    def __init__(self, inner: Policy, dec: ReplayDecoder, space: ActionSpace, costs: CostModel):
        super().__init__(inner, dec, space, costs)
        self.states: list[np.ndarray] = []
        self.outcomes: list[RoundOutcomes] = []

    def record(self, state: DecodeState) -> None:
        self.states.append(self.tracker.features(state, True))
        self.outcomes.append(round_outcomes(self.dec, state, self.space, self.costs))


class _EpsilonRound:
    """``inner`` with a uniformly random per-round action in a fraction ``epsilon`` of rounds (exploration for
    the DAgger iterations: states next to the fitted policy's own)."""

    def __init__(self, inner: RLPolicy, space: ActionSpace, epsilon: float, seed: int):
        self.inner, self.space, self.epsilon = inner, space, epsilon
        self.rng = random.Random(seed)
        self.name = f"eps{epsilon:g}({inner.name})"
        self._k = 0
        self._own = False

    def reset(self) -> None:
        self.inner.reset()

    def choose_exit(self, state: DecodeState) -> int | None:
        layer = self.inner.choose_exit(state)  # always called: it keeps the inner feature tracker in step
        self._own = self.rng.random() >= self.epsilon
        if self._own:
            return layer
        layer, self._k = self.space.round_of(self.rng.randrange(self.space.size))
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return self.inner.keep_drafting(state) if self._own else state.drafted < self._k


@dataclass
class FullInfoResult:
    policy: PolicyFile
    history: list[dict] = field(default_factory=list)  # per fit: rate, states, train MSE, replayed median/aggregate

    @property
    def rates(self) -> list[float]:
        """ρ of each fit (the first: ``rate``; then the previous fit's replayed rate)."""
        return [h["rate"] for h in self.history]

    @property
    def states(self) -> int:
        """Round starts in the final fit."""
        return self.history[-1]["states"]


def fit_round_values(states: np.ndarray, values: np.ndarray, space: ActionSpace, model: str, seed: int = 0,
                     hidden_units: tuple[int, ...] = (64, 64), epochs: int = 30, lr: float = 1e-3,
                     batch_size: int = 256) -> tuple[PolicyFile, float]:
    """Least squares of every action's value [N, A] on the standardised round-start features [N, F]; returns the
    policy file (``decision="round"``) and the final mean squared error over the data."""
    if len(states) == 0:
        raise PolicyError("no round starts to fit: the replayed sequences are empty or shorter than two tokens")
    if values.shape != (len(states), space.size) or states.shape[1] != len(feature_names(space)):
        raise PolicyError(f"states {states.shape} / values {values.shape} do not match the action space "
                          f"({space.size} actions, {len(feature_names(space))} features)")
    torch.manual_seed(seed)
    mean, std = states.mean(0), states.std(0) + 1e-6
    x = torch.from_numpy((states - mean) / std).float()
    y = torch.from_numpy(values).float()
    net = _mlp([x.shape[1], *[int(h) for h in hidden_units], space.size])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss = ((net(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            opt.step()
    with torch.no_grad():
        mse = float(((net(x) - y) ** 2).mean())
    pf = PolicyFile(model=model, exit_layers=list(space.exit_layers), max_draft_len=space.max_draft_len,
                    features=feature_names(space), mean=mean.tolist(), std=std.tolist(), algo=ALGO, seed=seed,
                    q_net=net, info={"hidden_units": list(hidden_units), "epochs": epochs, "lr": lr, "mse": mse,
                                     "states": int(len(x))}, decision="round")
    return pf, mse


def train_full_information(
    dec: ReplayDecoder, prompts: list[list[int]], behaviours: list[Policy], space: ActionSpace, costs: CostModel,
    model: str, seed: int = 0, rate: float = 1.0, rate_iterations: int = 2, epsilon: float = 0.2,
    max_new_tokens: int = 128, hidden_units: tuple[int, ...] = (64, 64), epochs: int = 30, lr: float = 1e-3,
) -> FullInfoResult:
    """Fit the round-level policy on the replayed ``prompts`` (training sequences only: never evaluation prompts).
    ``space``: the candidate drafters and maximum draft length (per-token or per-round; the policy is per round).
    The first fit uses the round starts of ``behaviours`` with ρ = ``rate``; each of ``rate_iterations`` more
    replays the current policy (ε-random rounds), sets ρ to its aggregate replayed rate and refits on all states so
    far, their values recomputed at the new ρ (values are linear in ρ: stored as tokens and cost separately)."""
    rspace = ActionSpace(space.exit_layers, space.max_draft_len, per_round=True)
    if not prompts:
        raise PolicyError("no training prompts to replay")
    feats: list[np.ndarray] = []
    outcomes: list[RoundOutcomes] = []

    def probe(policies: list[Policy]) -> None:
        for pol in policies:
            p = _Probe(pol, dec, rspace, costs)
            for ids in prompts:
                dec.generate(ids, p, max_new_tokens)
            feats.extend(p.states)
            outcomes.extend(p.outcomes)

    probe(behaviours)
    history, pf = [], None
    rho = rate
    for it in range(rate_iterations + 1):
        x = np.stack(feats)
        v = np.stack([o.tokens for o in outcomes]) - rho * np.stack([o.cost for o in outcomes])
        pf, mse = fit_round_values(x, v, rspace, model, seed, hidden_units, epochs, lr)
        speed = replay_speed(dec, prompts, RLPolicy(pf), costs, max_new_tokens)
        history.append({"iteration": it, "rate": rho, "states": len(x), "mse": mse, "replay_median": speed.median,
                        "replay_aggregate": speed.aggregate})
        log.info("full-information fit %d: rate %.3f, %d round starts, mse %.3f, replayed on the training "
                 "sequences %.3f (median) / %.3f (aggregate)", it, rho, len(x), mse, speed.median, speed.aggregate)
        if it == rate_iterations:
            break
        rho = speed.aggregate
        probe([_EpsilonRound(RLPolicy(pf), rspace, epsilon, seed + 1 + it)])
    res = FullInfoResult(pf, history)
    pf.info.update({"rates": res.rates, "history": history, "epsilon": epsilon})
    return res
