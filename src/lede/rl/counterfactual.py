"""Full-information offline data for the d3rlpy learners: at every replayed round start, the transition of *every*
per-round action, so DoubleDQN / DiscreteCQL / DiscreteBCQ are no longer limited to what the behaviour policies did.

    from lede.rl.counterfactual import counterfactual_data
    data = counterfactual_data(replay_decoder, prompts, behaviours, space, costs, model="smollm2-135m")
    res = train_policy(data, algo="DoubleDQN", decision="round", gamma=0.9)    # d3rlpy, every action covered
    RLPolicy(res.policy)                                                       # runs in the engine unchanged

Why. Engine-collected experience (``lede.rl.offline.collect_experience``) shows, at each logged state, the one action
the behaviour took; Q-learning must extrapolate the rest, and the conservative learners (CQL, BCQ) are held near the
behaviour mix by design. For greedy decoding the teacher-forced replay (``lede.rl.replay``) knows the outcome of every
action at every round start of a stored continuation c (``lede.rl.fullinfo.round_outcomes``): drafter d with K drafts
accepts min(A_d, K') and emits that + 1 tokens, for K'·c_d + v_{K'+1} plain steps. Its next state is known too: after
n' = n + emitted tokens the context is the greedy prefix c[:n'], whose position, last verified confidence
(``SequenceTable.verify[n' − 1]``) and copy signals depend on n' only, and the running statistics (previous round,
acceptance EMAs) are the tracked ones updated by the hypothetical round (``FeatureTracker.features_after``). So each
round start s yields A transitions (s, a, r_a, s'_a) with

    r_a = tokens_a − w · cost_a        (the per-round return of ``lede.rl.features``, summed over the round's decisions)

and s'_a terminal where the round emits the continuation's EOS; at the token budget s'_a is a timeout (bootstrapped,
as ``Experience.ends`` treats budget-cut generations).

How d3rlpy sees it. The round starts of the behaviour generations are the dataset's episodes (a ``ReplayBuffer`` of
``episode_class``); the ``CounterfactualPicker`` (a d3rlpy transition picker) answers each sampled round start
with the transition of a uniformly drawn action and the round start's row. The learners are d3rlpy's
(``lede.rl.offline.train_policy`` with ``decision="round"``; γ is per round), by default with lede's subclass of
their implementation (``lede.rl.offline.all_action_impls``) that fits the Bellman target of *every* action at each
sampled round start, not only the drawn one's: measured by replay on the dev split's validation part (2026-12-07,
DoubleDQN γ 0.5, w 1.5, 10k steps), 1.477× / 1.472× plain for two seeds against 1.437× with the drawn action only
(static lookup K4 1.468×, FullInfo 1.453×).

Reward weight. With w at the optimal rate ρ* (tokens per plain step), maximising Σ (tokens − w · time) maximises the
generation's speed (Dinkelbach; ``lede.rl.fullinfo``); with w = 1 long rounds that emit more tokens at a worse rate
look better than they are (the same measurement: γ 0.9, 1.29× plain with w = 1, 1.40× with w = 1.5). The workflow
takes w as the best static cell's replayed rate on the dev split (``policy.full_information.reward_weight: rate``).

States. The round starts are those the behaviour policies visit in replay (the same set as ``lede.rl.fullinfo``'s
first fit: static cells, random schedules, the oracle); unlike FullInfo's refits, no states of the fitted policy
itself are added.

Limits. Greedy decoding and the dev split's stored continuations only (the replay is teacher-forced); one decision per
round (K is chosen at the round start, not after each draft).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from lede.core.costs import CostModel
from lede.core.lookup import NgramIndex
from lede.core.policy import DecodeState, Policy, RoundRecord
from lede.rl.features import ActionSpace, copy_signals, feature_names
from lede.rl.fullinfo import RoundStartProbe, round_outcomes
from lede.rl.offline import PolicyError
from lede.rl.replay import ReplayDecoder


@dataclass
class CounterfactualData:
    """Round starts with every per-round action's transition. Quacks like ``lede.rl.offline.Experience`` where
    ``train_policy`` reads it (``check``, ``for_decision``, ``standardised``, ``mdp_dataset``, ``obs``, ``names``,
    ``space``, ``meta``, ``behaviour``)."""

    space: ActionSpace  # per round
    names: list[str]
    obs: np.ndarray  # [R, F] float32: round-start features
    rewards: np.ndarray  # [R, A] float32: r_a = tokens_a − w · cost_a
    next_obs: np.ndarray  # [R, A, F] float32: the round start after action a (zeros where terminal)
    terminal: np.ndarray  # [R, A] bool: action a ends the generation at its EOS
    episode: np.ndarray  # [R] int64: the behaviour generation of each round start, consecutive
    behaviour: list[str]  # per episode
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def transitions(self) -> int:
        """Counterfactual transitions: round starts × actions."""
        return int(self.rewards.size)

    def check(self) -> None:
        r, a, f = len(self), self.space.size, len(self.names)
        if r == 0:
            raise PolicyError("the full-information data is empty: no replayed round starts")
        if not self.space.per_round:
            raise PolicyError("full-information data needs a per-round action space")
        if self.names != feature_names(self.space):
            raise PolicyError("the data's feature names do not match this version's feature layout: rebuild it")
        shapes = {"obs": (r, f), "rewards": (r, a), "next_obs": (r, a, f), "terminal": (r, a), "episode": (r,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise PolicyError(f"full-information data: {name} has shape {getattr(self, name).shape}, not {shape}")
        if r >= 2**24:  # the picker passes a row through d3rlpy's float32 next_action
            raise PolicyError(f"full-information data: {r} round starts; at most 2**24 fit the picker's row index")
        if (np.diff(self.episode) < 0).any() or int(self.episode.max()) + 1 != len(self.behaviour):
            raise PolicyError("full-information data: episodes are not consecutive, or their names do not match")

    def for_decision(self, decision: str) -> "CounterfactualData":
        if decision != "round":
            raise PolicyError("full-information data has one decision per round: train it with decision='round' "
                              "(policy.decision: round)")
        return self

    def standardised(self, mean: np.ndarray, std: np.ndarray) -> "CounterfactualData":
        """The same data with the features of every state (round starts and next states) standardised."""
        next_obs = np.where(self.terminal[..., None], 0.0, (self.next_obs - mean) / std).astype(np.float32)
        return dataclasses.replace(self, obs=((self.obs - mean) / std).astype(np.float32), next_obs=next_obs)

    def mdp_dataset(self, discount: str = "round", phase_threshold: float = 0.5):
        """A d3rlpy ``ReplayBuffer``: one episode per behaviour generation (its round starts), sampled transitions
        answered by ``CounterfactualPicker`` (a uniformly drawn action's). ``discount`` must be per round: each
        transition is one round; ``phase_threshold`` is unused (every state is a round start)."""
        import d3rlpy

        if discount not in ("round", "decision"):
            raise ValueError(f"discount={discount!r}: use round (policy.discount)")
        bounds = np.flatnonzero(np.diff(self.episode)) + 1
        episodes = []
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(self)]):
            episodes.append(episode_class()(observations=self.obs[lo:hi],
                                                  actions=np.zeros((hi - lo, 1), dtype=np.int64),
                                                  rewards=self.rewards[lo:hi, :1].copy(), terminated=True,
                                                  first_row=lo))
        return d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(), episodes=episodes,
                                           transition_picker=CounterfactualPicker(self),
                                           action_space=d3rlpy.constants.ActionSpace.DISCRETE,
                                           action_size=self.space.size)


@functools.cache
def episode_class() -> type:
    """``CounterfactualEpisode``: d3rlpy's ``Episode`` with ``first_row``, the row in ``CounterfactualData`` of its
    first round start. ``terminated`` is True so that every round start is a transition (the picker supplies the
    next state). Made on first use: importing d3rlpy costs seconds, and this module is imported without it."""
    from d3rlpy.dataset import Episode

    @dataclasses.dataclass(frozen=True)
    class CounterfactualEpisode(Episode):
        first_row: int = 0

    return CounterfactualEpisode


class CounterfactualPicker:
    """d3rlpy transition picker (``TransitionPickerProtocol``): the round start at (episode, index) with a uniformly
    drawn action a, its reward r_a and next state s'_a (terminal where a ends the generation). ``next_action``
    carries the round start's row in the data, which d3rlpy's discrete Q-learners never read and lede's all-action
    learners (``lede.rl.offline.all_action_impls``) use to fit every action's transition of that round start."""

    def __init__(self, data: CounterfactualData):
        self.data = data

    def __call__(self, episode, index: int):
        from d3rlpy.dataset import Transition

        row = episode.first_row + index
        a = np.random.randint(self.data.space.size)  # numpy's global RNG, as d3rlpy's own sampling: d3rlpy.seed
        reward = self.data.rewards[row, a : a + 1]
        return Transition(observation=self.data.obs[row], action=np.array([a], dtype=np.int64), reward=reward,
                          next_observation=self.data.next_obs[row, a], next_action=np.array([row], dtype=np.int64),
                          terminal=float(self.data.terminal[row, a]), interval=1, rewards_to_go=reward[None])


class _Branches(RoundStartProbe):
    """Records, at each round start of ``inner``, the features and every action's reward, next-state features and
    terminal flag."""

    kind = "branches"

    def __init__(self, inner: Policy, dec: ReplayDecoder, space: ActionSpace, costs: CostModel, weight: float):
        super().__init__(inner, dec, space, costs)
        self.weight = weight
        self.obs: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.next_obs: list[np.ndarray] = []
        self.terminal: list[np.ndarray] = []
        self._signals: dict[tuple[int, ...], list[tuple[float, float, float, float]]] = {}
        self._eos = set(dec.lm.eos_token_ids)

    def signals(self, key: tuple[int, ...]) -> list[tuple[float, float, float, float]]:
        """Copy signals of the context prompt + c[:n], for n = 0 .. len(c) (depend on n only)."""
        if key not in self._signals:
            c, index, kmax = self.dec.tables[key].continuation, NgramIndex(), self.space.max_draft_len
            self._signals[key] = [copy_signals(index.sync(list(key), c[:n]), kmax) for n in range(len(c) + 1)]
        return self._signals[key]

    def record(self, state: DecodeState) -> None:
        key = tuple(state.prompt_ids)
        table, n, space = self.dec.tables[key], len(state.tokens), self.space
        out = round_outcomes(self.dec, state, space, self.costs)
        signals = self.signals(key)
        x = self.tracker.features(state, True)
        nxt = np.zeros((space.size, len(x)), dtype=np.float32)
        end = np.zeros(space.size, dtype=bool)
        for a in range(space.size):
            layer, _ = space.round_of(a)
            k, emitted = int(out.drafted[a]), int(out.tokens[a])
            n2 = n + emitted
            if any(t in self._eos for t in table.continuation[n:n2]):
                end[a] = True
                continue
            record = RoundRecord(layer if k else None, k, emitted - 1, 0.0, 0.0, 0.0)
            nxt[a] = self.tracker.features_after(state, record, table.verify[n2 - 1], signals[n2])
        self.obs.append(x)
        self.rewards.append(out.tokens - self.weight * out.cost)
        self.next_obs.append(nxt)
        self.terminal.append(end)


def counterfactual_data(dec: ReplayDecoder, prompts: list[list[int]], behaviours: list[Policy], space: ActionSpace,
                        costs: CostModel, model: str, reward_weight: float = 1.0,
                        max_new_tokens: int = 128) -> CounterfactualData:
    """Replay each of ``behaviours`` on each of ``prompts`` (training sequences only: never evaluation prompts) and
    record, at every round start, every per-round action's transition (module docstring). ``space``: the candidate
    drafters and maximum draft length (per token or per round; the data is per round)."""
    if not prompts or not behaviours:
        raise PolicyError("full-information data needs training prompts and behaviour policies to replay")
    rspace = ActionSpace(space.exit_layers, space.max_draft_len, per_round=True)
    parts: list[_Branches] = []
    episode: list[int] = []
    names: list[str] = []
    for pol in behaviours:
        probe = _Branches(pol, dec, rspace, costs, reward_weight)
        for ids in prompts:
            before = len(probe.obs)
            dec.generate(ids, probe, max_new_tokens)
            if len(probe.obs) > before:
                episode += [len(names)] * (len(probe.obs) - before)
                names.append(pol.name)
        parts.append(probe)
    if not episode:
        raise PolicyError("no round starts were replayed: the sequences are empty or shorter than two tokens")

    def stack(attr: str) -> np.ndarray:
        return np.stack([v for p in parts for v in getattr(p, attr)])

    data = CounterfactualData(rspace, feature_names(rspace), stack("obs"), stack("rewards").astype(np.float32),
                              stack("next_obs"), stack("terminal"), np.asarray(episode, dtype=np.int64), names,
                              {"model": model, "reward_weight": reward_weight, "reward_credit": "round",
                               "max_new_tokens": max_new_tokens, "full_information": True,
                               "behaviours": [b.name for b in behaviours], "sequences": len(prompts)})
    data.check()
    return data
