"""LEDE's offline RL: log experience from behaviour policies, train a Q-function with d3rlpy, decode with it.

    from lede.rl.offline import collect_experience, train_policy, RLPolicy
    exp = collect_experience(decoder, prompts, behaviours, space, costs, max_new_tokens=128)
    exp.save("results/rl/experience")                    # .parquet (tabular) + .h5 (d3rlpy ReplayBuffer)
    result = train_policy(exp, algo="DiscreteCQL", seed=0, n_steps=20000, log_dir="results/rl/logs")
    result.policy.save("results/rl/policy_cql_s0.pt")
    out = decoder.generate(ids, RLPolicy.load("results/rl/policy_cql_s0.pt", lm_name=lm.name), 128)

The decision process, features and rewards are defined in ``lede.rl.features``. Experience is logged by
``Recorder``, a wrapper that passes a behaviour policy's decisions through unchanged and records the
state features and action of each. Rewards are computed after each generation from its rounds and the
measured cost model. ``RLPolicy`` evaluates the trained Q-network once per decision, as one small batched
forward over all actions, and takes the argmax over the actions valid in that phase.
"""

from __future__ import annotations

import functools
import json
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lede.core.costs import CostModel
from lede.core.io import atomic_path, atomic_write_text, safe_torch_load
from lede.rl.features import CREDITS, ActionSpace, FeatureTracker, decision_rewards, feature_names
from lede.core.policy import DecodeState, Policy

POLICY_FORMAT = "lede-rl-policy/1"
ALGOS = ("DiscreteCQL", "DiscreteBCQ", "DoubleDQN", "DiscreteBC")
DECISIONS = ("token", "round")  # policy.decision: see Experience.per_round
DISCOUNTS = ("decision", "round")  # policy.discount: γ per decision, or per round (RoundDiscount)
# Full-information data (lede.rl.counterfactual) is fitted with its rewards scaled by this (times ``reward_scale``):
# the uniform picker puts every long draft's all-or-nothing outcome (lookup K8: −0.5 or up to +7.5) at every round
# start, and d3rlpy's Huber loss (width 1) then fits their median, not their mean (DoubleDQN-FI on the 2026-12-07 study:
# Q − target for lookup K8 mean −1.07, median −0.06; lookup K1 chosen in 27% of rounds, K8 in 2%; replayed 1.16x on
# its own dev sequences; with 0.1: 1.39x / 1.36x for seeds 0 / 1000, lookup K8 1.36x, FullInfo 1.42x).
FULL_INFO_REWARD_SCALE = 0.1


class RoundDiscount:
    """d3rlpy transition picker for a discount per round instead of per decision: the transition of a decision
    that ends its round (the next state is a round start, or the episode ends) has ``interval`` 1, one inside a
    round (a drafter chosen, "one more") ``interval`` 0, and d3rlpy's Q-learning targets discount by
    γ^interval. Why: ``lede.rl.features``, *Discount* — a round of K drafts takes K + 1 decisions, so a per-decision
    γ taxes every draft; per round it does not, while the decisions inside the round stay the paper's."""

    def __init__(self, phase_index: int, threshold: float):
        from d3rlpy.dataset import BasicTransitionPicker

        self.phase_index, self.threshold = phase_index, threshold
        self._basic = BasicTransitionPicker()

    def __call__(self, episode, index: int):
        t = self._basic(episode, index)
        # an episode's last row has no next state (a terminal); a budget-cut episode's last transition does: its
        # next row, whose phase says whether the round ended there
        last = index + 1 >= episode.size()
        ends_round = last or float(episode.observations[index + 1][self.phase_index]) > self.threshold
        return replace(t, interval=int(ends_round))


class PolicyError(ValueError):
    """A policy file or dataset that does not fit the model, candidate layers or feature layout."""


class Recorder:
    """Wraps a behaviour policy; records (features, action) at every decision it makes."""

    def __init__(self, policy: Policy, space: ActionSpace):
        self.policy, self.space = policy, space
        self.tracker = FeatureTracker(space)
        self.name = policy.name
        self.obs: list[np.ndarray] = []
        self.actions: list[int] = []

    def reset(self) -> None:
        self.policy.reset()
        self.obs, self.actions = [], []

    def choose_exit(self, state: DecodeState) -> int | None:
        self.obs.append(self.tracker.features(state, start_of_round=True))
        layer = self.policy.choose_exit(state)
        self.actions.append(self.space.start_action(layer))
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        self.obs.append(self.tracker.features(state, start_of_round=False))
        more = self.policy.keep_drafting(state)
        self.actions.append(self.space.more if more else self.space.stop)
        return more


class EpsilonPerturbed:
    """A base policy whose every decision is replaced, with probability ε, by a random valid one."""

    def __init__(self, base: Policy, space: ActionSpace, epsilon: float, seed: int = 0):
        self.base, self.space, self.epsilon, self.seed = base, space, epsilon, seed
        self.name = f"eps{epsilon:g}_{base.name}"
        self.reset()

    def reset(self) -> None:
        self.base.reset()
        self._rng = random.Random(self.seed)

    def choose_exit(self, state: DecodeState) -> int | None:
        layer = self.base.choose_exit(state)
        if self._rng.random() < self.epsilon:
            return self._rng.choice([None, *self.space.exit_layers])
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        more = self.base.keep_drafting(state)
        return (self._rng.random() < 0.5) if self._rng.random() < self.epsilon else more


@dataclass
class Experience:
    """Logged transitions, one row per decision, episodes (generations) consecutive."""

    space: ActionSpace
    names: list[str]
    obs: np.ndarray  # [N, F] float32
    actions: np.ndarray  # [N] int64
    rewards: np.ndarray  # [N] float32
    terminals: np.ndarray  # [N] float32: 1 at the last decision of a generation
    episode: np.ndarray  # [N] int64
    behaviour: list[str]  # per episode
    prompt: list[str]  # per episode
    category: list[str]  # per episode
    meta: dict = field(default_factory=dict)
    # per episode: did the generation stop at the token budget (a time limit, not an end of the task)? Its last
    # decision is then no terminal for the Q-target (``mdp_dataset``). None: every episode ended at EOS.
    truncated: list[bool] | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def check(self) -> None:
        if len(self) == 0:
            raise PolicyError("the experience dataset is empty: collect experience first (no transitions)")
        if self.obs.shape[1] != len(self.names):
            raise PolicyError(f"feature layout mismatch: {self.obs.shape[1]} columns, {len(self.names)} names")
        if self.names != feature_names(self.space):
            raise PolicyError("the dataset's feature names do not match this version's feature layout: recollect it")
        if self.truncated is not None and len(self.truncated) != len(self.behaviour):
            raise PolicyError(f"{len(self.truncated)} truncation flags for {len(self.behaviour)} episodes")

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Per decision: (terminal, timeout) float32. A generation that ended at EOS or a stop string ends the
        task: its last decision is terminal (nothing more to gain). One that ran out of token budget is
        truncated by a time limit the state does not show (a user's next budget would go on decoding): its last
        decision is a timeout, so the Q-target bootstraps instead of treating it as absorbing, and values do not
        hinge on the unobservable distance to the budget's end (Pardo et al., 2018, "Time Limits in
        Reinforcement Learning"). d3rlpy then drops the truncated episode's last decision, which has no next
        state. Measured (DiscreteCQL, replay on a validation split): see ``lede.rl.features``."""
        cut = self._truncated_rows().astype(np.float32)
        return self.terminals * (1.0 - cut), self.terminals * cut

    def _truncated_flags(self) -> list[bool]:
        """Per episode (all False when the dataset carries no flags)."""
        return [bool(t) for t in self.truncated] if self.truncated is not None else [False] * len(self.behaviour)

    def _truncated_rows(self) -> np.ndarray:
        """Per decision: its episode's truncation flag [N] bool."""
        return np.asarray(self._truncated_flags(), dtype=bool)[self.episode]

    def per_round(self) -> "Experience":
        """The same experience with one decision per round (``ActionSpace(per_round=True)``): the round-start
        state, the action (drafter, K drafted), the round's return R (the sum of its decisions' rewards, so the
        undiscounted return is unchanged) and the terminal flag of its last decision.

        Why offer it: with a decision after every draft, a round of K drafts takes K + 1 decisions, so a discount
        per decision taxes drafting (``lede.rl.features``, *Discount*), and the value of drafting one more token
        shows only through a chain of bootstrapped "more" decisions whose features (the exit head's confidence;
        nothing for a lookup draft) say little. Per round, the discount is per round and (L, K) is valued in one
        step from the round-start state. K is what was drafted: a lookup proposal or the budget may end a draft
        before the behaviour policy would have stopped, and the same happens to the learned policy's choice.
        Measured by replay on the dev split's validation part (``lede.rl.learner_validation``): worse than per
        decision for two seeds at γ 0.9 and 0.99 (``lede.rl.features``, *Decisions per round*), so an ablation."""
        if self.space.per_round:
            return self
        self.check()
        kmax = self.space.max_draft_len
        start = np.flatnonzero(self.obs[:, self.names.index("phase_start")] == 1.0)  # [R] each round's first row
        if start.size == 0 or start[0] != 0:
            raise PolicyError("the experience does not begin with a round-start decision: recollect it")
        end = np.append(start[1:], len(self))  # [R] one past each round's last row
        k = end - start - 1  # [R] drafts in the round
        if (self.episode[start] != self.episode[end - 1]).any() or (k > kmax).any():
            raise PolicyError("a round of the experience spans two episodes or drafts more than max_draft_len: "
                              "recollect it")
        space = ActionSpace(self.space.exit_layers, kmax, per_round=True)
        try:  # the ids are ActionSpace's; a stop / one-more action at a round start is not a drafter
            actions = np.array([space.round_action(self.space.layer_of(int(a)), int(n))
                                for a, n in zip(self.actions[start], k)], dtype=np.int64)
        except ValueError as e:
            raise PolicyError(f"a round of the experience does not start with a drafter choice ({e}): recollect it") from e
        return Experience(space, self.names, self.obs[start], actions,
                          np.add.reduceat(self.rewards, start).astype(np.float32), self.terminals[end - 1],
                          self.episode[start], self.behaviour, self.prompt, self.category, self.meta, self.truncated)

    @property
    def transitions(self) -> int:
        return len(self)

    def for_decision(self, decision: str) -> "Experience":
        """The data a learner of ``decision`` ("token" or "round", ``train_policy``) fits: this, or ``per_round()``."""
        if decision not in DECISIONS:
            raise ValueError(f"decision={decision!r}: use one of {', '.join(DECISIONS)} (policy.decision)")
        return self.per_round() if decision == "round" else self

    def standardised(self, mean: np.ndarray, std: np.ndarray) -> "Experience":
        """The same experience with its features standardised (every other field as logged)."""
        return replace(self, obs=(self.obs - mean) / std)

    def mdp_dataset(self, discount: str = "decision", phase_threshold: float = 0.5):
        """The d3rlpy dataset. ``discount="round"``: each transition carries d3rlpy's ``interval`` (the learner
        discounts by γ^interval): 1 for the decision that ends a round, 0 inside it, so γ is per round and
        drafting one more token is not discounted (``RoundDiscount``). ``phase_threshold``: the value of the
        ``phase_start`` feature above which a row is a round start (0.5 raw; train_policy passes the
        standardised one)."""
        import d3rlpy

        if discount not in DISCOUNTS:
            raise ValueError(f"discount={discount!r}: use one of {', '.join(DISCOUNTS)} (policy.discount)")
        terminals, timeouts = self.ends()
        picker = RoundDiscount(self.names.index("phase_start"), phase_threshold) if discount == "round" else None
        return d3rlpy.dataset.MDPDataset(self.obs, self.actions, self.rewards, terminals, timeouts=timeouts,
                                         action_size=self.space.size, transition_picker=picker)

    def save(self, stem: str | Path) -> None:
        """``stem.parquet`` (one row per decision, for analysis) and ``stem.h5`` (d3rlpy ReplayBuffer),
        plus ``stem.json`` (layout); each written atomically."""
        import json

        import pandas as pd

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame(self.obs, columns=self.names)
        df.insert(0, "episode", self.episode)
        df.insert(1, "behaviour", [self.behaviour[e] for e in self.episode])
        df.insert(2, "prompt", [self.prompt[e] for e in self.episode])
        df.insert(3, "category", [self.category[e] for e in self.episode])
        df["action"], df["reward"], df["terminal"] = self.actions, self.rewards, self.terminals
        df["truncated"] = self._truncated_rows()
        with atomic_path(stem.with_suffix(".parquet")) as tmp:
            df.to_parquet(tmp, index=False)
        with atomic_path(stem.with_suffix(".h5")) as tmp, open(tmp, "w+b") as f:
            self.mdp_dataset().dump(f)
        layout = {"exit_layers": list(self.space.exit_layers), "max_draft_len": self.space.max_draft_len,
                  "features": self.names, "meta": self.meta}
        atomic_write_text(stem.with_suffix(".json"), json.dumps(layout, indent=1))

    @classmethod
    def concat(cls, parts: Sequence["Experience"]) -> "Experience":
        """One dataset of several (e.g. engine-collected and replayed), episodes renumbered in order; all
        parts must share the action space and feature layout."""
        if not parts:
            raise PolicyError("nothing to concatenate: no experience datasets")
        first = parts[0]
        for part in parts[1:]:
            if part.space != first.space or part.names != first.names:
                raise PolicyError("experience datasets with different action spaces or feature layouts: recollect them")
        for key in ("model", "reward_weight", "reward_credit"):  # a policy is trained for one model and one reward
            values = {repr(p.meta.get(key)) for p in parts}
            if len(values) > 1:
                raise PolicyError(f"experience datasets with different {key}s ({', '.join(sorted(values))}): "
                                  "collect them with the same model and reward")
        offsets = np.cumsum([0] + [len(p.behaviour) for p in parts[:-1]])
        return cls(first.space, first.names, np.concatenate([p.obs for p in parts]),
                   np.concatenate([p.actions for p in parts]), np.concatenate([p.rewards for p in parts]),
                   np.concatenate([p.terminals for p in parts]),
                   np.concatenate([p.episode + o for p, o in zip(parts, offsets)]),
                   [b for p in parts for b in p.behaviour], [u for p in parts for u in p.prompt],
                   [c for p in parts for c in p.category],
                   {"model": first.meta.get("model"), "reward_weight": first.meta.get("reward_weight"),
                    "reward_credit": first.meta.get("reward_credit"), "parts": [p.meta for p in parts]},
                   [t for p in parts for t in p._truncated_flags()])

    @classmethod
    def load(cls, stem: str | Path) -> "Experience":
        import json

        import pandas as pd

        stem = Path(stem)
        layout = json.loads(stem.with_suffix(".json").read_text())
        df = pd.read_parquet(stem.with_suffix(".parquet"))
        space = ActionSpace(tuple(layout["exit_layers"]), layout["max_draft_len"])
        names = layout["features"]
        if "truncated" not in df.columns:
            raise PolicyError(f"{stem}.parquet has no 'truncated' column (written by an older version): recollect it")
        episodes = df.groupby("episode", sort=True).first()
        exp = cls(space, names, df[names].to_numpy(np.float32), df["action"].to_numpy(np.int64),
                  df["reward"].to_numpy(np.float32), df["terminal"].to_numpy(np.float32),
                  df["episode"].to_numpy(np.int64), episodes["behaviour"].tolist(), episodes["prompt"].tolist(),
                  episodes["category"].tolist(), layout.get("meta", {}), episodes["truncated"].astype(bool).tolist())
        exp.check()
        return exp


def collect_experience(
    decoder, prompts: Sequence[tuple[str, str, list[int]]], behaviours: Sequence[Policy], space: ActionSpace,
    costs: CostModel, max_new_tokens: int, reward_weight: float = 1.0, credit: str = "at_verify",
    progress: bool = True,
) -> Experience:
    """Run every behaviour policy on every prompt (uid, category, ids) with the real engine (greedy) and
    log each decision. ``decoder`` may be a ``lede.rl.replay.ReplayDecoder`` (teacher-forced replay of the
    distillation sequences; see its module for what is exact): the meta then says how many decisions saw
    an approximate state. ``reward_weight`` and ``credit``: the reward (``lede.rl.features``)."""
    if credit not in CREDITS:
        raise ValueError(f"unknown reward credit {credit!r}: use one of {', '.join(CREDITS)}")
    obs, actions, rewards, terminals, episode = [], [], [], [], []
    beh, pr, cat, cut = [], [], [], []
    bar = tqdm(total=len(prompts) * len(behaviours), desc="experience", disable=not progress, mininterval=10)
    for uid, category, ids in prompts:
        for policy in behaviours:
            rec = Recorder(policy, space)
            out = decoder.generate(ids, rec, max_new_tokens=max_new_tokens)
            if not rec.actions:
                bar.update()
                continue  # a generation that ended at the prefill: no decision was made
            r = decision_rewards(rec.actions, out.rounds, space, costs, reward_weight, credit, prompt_len=len(ids))
            e = len(beh)
            obs += rec.obs
            actions += rec.actions
            rewards += r
            terminals += [0.0] * (len(r) - 1) + [1.0]
            episode += [e] * len(r)
            beh.append(policy.name)
            pr.append(uid)
            cat.append(category)
            cut.append(out.finish_reason == "length")
            bar.update()
    bar.close()
    exp = Experience(space, feature_names(space), np.asarray(obs, np.float32).reshape(-1, len(feature_names(space))),
                     np.asarray(actions, np.int64), np.asarray(rewards, np.float32), np.asarray(terminals, np.float32),
                     np.asarray(episode, np.int64), beh, pr, cat,
                     {"model": decoder.lm.name, "reward_weight": reward_weight, "reward_credit": credit,
                      "max_new_tokens": max_new_tokens}, cut)
    if hasattr(decoder, "approx_decisions"):  # a replay
        exp.meta["replay"] = {"decisions": decoder.decisions, "approx_decisions": decoder.approx_decisions}
    exp.check()
    return exp


# ---- the learned policy -------------------------------------------------------------------------------


@dataclass
class PolicyFile:
    model: str
    exit_layers: list[int]
    max_draft_len: int
    features: list[str]
    mean: list[float]
    std: list[float]
    algo: str
    seed: int
    q_net: nn.Module  # maps standardised features [B, F] -> Q-values [B, A]
    info: dict = field(default_factory=dict)
    # DiscreteBCQ only: the behaviour-cloning network [B, F] -> logits [B, A]; actions whose probability is
    # below info["action_flexibility"] x the most likely one's are not chosen (d3rlpy's BCQ rule)
    imitator: nn.Module | None = None
    decision: str = "token"  # "token": stop / one more after each draft; "round": (drafter, K) at the round start

    def save(self, path: str | Path) -> None:
        nets = {"q_net": self.q_net.state_dict(), "arch": _arch(self.q_net)}
        if self.imitator is not None:
            nets.update(imitator=self.imitator.state_dict(), imitator_arch=_arch(self.imitator))
        # plain data only (numpy scalars and tuples made Python's), so RLPolicy.load can use weights_only
        plain = json.loads(json.dumps({k: v for k, v in self.__dict__.items() if k not in ("q_net", "imitator")},
                                      default=lambda o: o.item() if hasattr(o, "item") else list(o)))
        with atomic_path(path) as tmp:
            torch.save({"format": POLICY_FORMAT, **plain, **nets}, tmp)


def _arch(net: nn.Sequential) -> list[int]:
    return [net[0].in_features] + [m.out_features for m in net if isinstance(m, nn.Linear)]


def _numpy_mlp(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W^T, b) per Linear of a Linear/ReLU MLP, float32, for the per-decision forward in numpy: for a
    1 x 256 MLP torch's per-op dispatch costs ~4x the arithmetic (~90 vs ~20 us per decision measured on a
    2-core CPU), and this time is part of every round."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    if [type(m) for m in net] != [t for _ in linears for t in (nn.Linear, nn.ReLU)][:-1]:
        raise PolicyError("the policy's network is not a Linear/ReLU MLP: retrain it with this version")
    return [(m.weight.detach().float().numpy().T.copy(), m.bias.detach().float().numpy().copy()) for m in linears]


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], h: np.ndarray) -> np.ndarray:
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < last:
            h = np.maximum(h, 0.0)  # ReLU
    return h


def greedy_action(q: np.ndarray, valid: np.ndarray, logits: np.ndarray | None = None,
                  flexibility: float = 0.3) -> np.ndarray:
    """argmax of Q [B, A] over the valid actions; with a BCQ imitator's ``logits``, only over the actions
    whose imitator probability is at least ``flexibility`` x the most likely valid action's (d3rlpy's
    DiscreteBCQ rule, restricted to the valid actions; Q is shifted to >= 1e-5 first, as d3rlpy does, so
    the filter is a product with a 0/1 mask)."""
    q = np.atleast_2d(q)
    valid = np.broadcast_to(valid, q.shape)
    if logits is not None:
        lp = np.where(valid, np.atleast_2d(logits), -np.inf)
        lp = lp - lp.max(axis=1, keepdims=True)  # log p(a) - log max p, over the valid actions
        valid = valid & (lp > math.log(flexibility))
        q = q - np.where(valid, q, np.inf).min(axis=1, keepdims=True) + 1e-5
    return np.where(valid, q, -np.inf).argmax(axis=1)


def _mlp(arch: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(arch) - 1):
        layers.append(nn.Linear(arch[i], arch[i + 1]))
        if i < len(arch) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RLPolicy:
    """The learned policy: argmax of Q over the valid actions at each decision."""

    def __init__(self, pf: PolicyFile):
        self.pf = pf
        if pf.decision not in DECISIONS:
            raise PolicyError(f"policy decision {pf.decision!r} is not one of {', '.join(DECISIONS)}: retrain it")
        self.space = ActionSpace(tuple(pf.exit_layers), pf.max_draft_len, per_round=pf.decision == "round")
        self._draft_len = 0  # per round: the K chosen at this round's start
        if feature_names(self.space) != pf.features:
            raise PolicyError("the policy's feature layout differs from this version's: retrain the policy")
        self.tracker = FeatureTracker(self.space)
        self.name = f"lede_{pf.algo}_s{pf.seed}"
        self.mean = np.asarray(pf.mean, dtype=np.float32)
        self.inv_std = (1.0 / np.asarray(pf.std, dtype=np.float64)).astype(np.float32)
        self.net = pf.q_net.eval()
        # The per-decision forward runs in numpy: for a 1 x 256 MLP, torch's per-op dispatch costs ~4x the
        # arithmetic (measured ~90 vs ~20 us per decision on this CPU), and this time is part of every round.
        self._layers = _numpy_mlp(self.net)
        self._imitator = _numpy_mlp(pf.imitator) if pf.imitator is not None else None
        self._flex = float(pf.info.get("action_flexibility", 0.3))
        self._valid = {s: self.space.valid_mask(s) for s in (True, False)}

    @classmethod
    def load(cls, path: str | Path, lm_name: str | None = None, exit_layers: Sequence[int] | None = None) -> "RLPolicy":
        blob = safe_torch_load(path, PolicyError, "lede policy file")
        if not isinstance(blob, dict) or blob.get("format") != POLICY_FORMAT:
            raise PolicyError(f"{path} is not a lede policy file ({POLICY_FORMAT})")
        if lm_name is not None and blob["model"] != lm_name:
            raise PolicyError(f"policy {path} was trained for model {blob['model']!r}, not {lm_name!r}: retrain it")
        if exit_layers is not None and list(exit_layers) != blob["exit_layers"]:
            raise PolicyError(f"policy {path} was trained for candidate layers {blob['exit_layers']}, "
                              f"not {list(exit_layers)}: retrain it for this candidate set")
        blob.pop("format")
        nets = {}
        for key in ("q_net", "imitator"):
            if key in blob:
                nets[key] = _mlp(blob.pop("arch" if key == "q_net" else "imitator_arch"))
                nets[key].load_state_dict(blob.pop(key))
        return cls(PolicyFile(**nets, **blob))

    def reset(self) -> None:
        pass  # the feature tracker resets itself at a new generation

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) - self.mean) * self.inv_std  # as in training

    def q_values(self, x: np.ndarray) -> np.ndarray:
        """Q of every action for the raw feature vector(s) ``x`` [..., F] -> [..., A] (the exported net's maths)."""
        return _forward(self._layers, self._standardise(x))

    def choose(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The greedy action for raw features ``x`` [B, F] among the ``valid`` ones ([A] or [B, A] bool)."""
        z = self._standardise(x)
        return greedy_action(_forward(self._layers, z), valid,
                             _forward(self._imitator, z) if self._imitator is not None else None, self._flex)

    def _act(self, state: DecodeState, start: bool) -> int:
        return int(self.choose(self.tracker.features(state, start)[None], self._valid[start])[0])

    def choose_exit(self, state: DecodeState) -> int | None:
        action = self._act(state, True)
        if self.space.per_round:
            layer, self._draft_len = self.space.round_of(action)
            return layer
        return self.space.layer_of(action)

    def keep_drafting(self, state: DecodeState) -> bool:
        if self.space.per_round:
            return state.drafted < self._draft_len  # no decision, no forward: K was chosen at the round start
        return self._act(state, False) == self.space.more


# ---- training --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    policy: PolicyFile
    history: list[dict]  # per epoch: td_error, initial_state_value, loss (+ fqe_initial_state_value)
    fqe_value: float | None  # None until off_policy_value ran (train_policy runs it unless fqe_steps=0)
    fitted: object = field(default=None, repr=False)  # the d3rlpy algorithm, for off_policy_value
    dataset: object = field(default=None, repr=False)  # the standardised ReplayBuffer it was fitted on
    sample: list = field(default_factory=list, repr=False)  # the episodes the per-epoch metrics read


@contextmanager
def _rng_preserved():
    """Restores Python's, NumPy's and torch's (CPU and every CUDA device's) random states on exit, so that what
    runs inside does not change what the caller's random stream draws next."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _fqe(algo, gamma: float):
    """d3rlpy's fitted Q evaluation of ``algo``'s greedy policy, configured once for the per-epoch and the final
    estimate."""
    import d3rlpy

    return d3rlpy.ope.DiscreteFQE(algo=algo, config=d3rlpy.ope.FQEConfig(learning_rate=1e-4, gamma=gamma))


class EpochFQE:
    """A d3rlpy evaluator: the off-policy estimate per epoch. At each epoch's end it continues one fitted Q
    evaluation (d3rlpy's ``DiscreteFQE``) of the policy as it stands by ``steps`` gradient steps — warm-started,
    so it tracks the changing policy at a total cost of ``steps`` × epochs — and reads its initial-state value on
    ``episodes``. Its random draws come from saved and restored states, so the training it watches is step for
    step the same as without it (``tests/test_rl.py``)."""

    def __init__(self, steps: int, gamma: float, episodes: list):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1 (policy.fqe_epoch_steps; 0 in the config turns it off)")
        self.steps, self.gamma, self.episodes = steps, gamma, episodes
        self.fqe = None

    def __call__(self, algo, dataset) -> float:
        import d3rlpy
        from d3rlpy.metrics import InitialStateValueEstimationEvaluator

        with _rng_preserved():
            if self.fqe is None:
                self.fqe = _fqe(algo, self.gamma)
            self.fqe.fit(dataset, n_steps=self.steps, n_steps_per_epoch=self.steps, with_timestamp=False,
                         logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False, save_interval=10**9)
            return float(InitialStateValueEstimationEvaluator(self.episodes)(self.fqe, dataset))


def _algo_config(algo: str, batch_size: int, gamma: float, lr: float, hidden_units: Sequence[int],
                 target_update_interval: int = 1000, cql_alpha: float = 0.3, reward_scale: float = 1.0):
    import d3rlpy

    if algo not in ALGOS:
        raise PolicyError(f"unknown RL algorithm {algo!r}: use one of {', '.join(ALGOS)}")
    if not hidden_units or any(int(h) < 1 for h in hidden_units):
        raise PolicyError(f"hidden_units={list(hidden_units)} must be one or more positive layer widths")
    if not reward_scale > 0:
        raise PolicyError(f"reward_scale={reward_scale} must be > 0 (policy.reward_scale)")
    common = dict(batch_size=batch_size,
                  encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[int(h) for h in hidden_units]))
    if algo == "DiscreteBC":
        return d3rlpy.algos.DiscreteBCConfig(learning_rate=lr, **common)
    if reward_scale != 1.0:  # see train_policy: keeps d3rlpy's Huber loss in its quadratic (mean-seeking) range
        common["reward_scaler"] = d3rlpy.preprocessing.MultiplyRewardScaler(multiplier=reward_scale)
    cls = getattr(d3rlpy.algos, f"{algo}Config")
    if algo == "DiscreteCQL":
        common["alpha"] = cql_alpha
    return cls(learning_rate=lr, gamma=gamma, target_update_interval=target_update_interval, **common)


@functools.cache
def valid_action_impls() -> dict[str, type]:
    """lede's subclasses of d3rlpy's implementation classes, per algorithm: the learner sees only the actions valid
    in each state's phase (``ActionSpace.valid_mask``).

    d3rlpy has no state-dependent action sets: its Double-DQN target bootstraps from the argmax of Q over *all*
    actions at the next state, and DiscreteCQL's penalty takes its logsumexp over all of them. After a drafted
    token only "stop" and "one more" are possible, yet the target's argmax there could pick a round-start
    action whose Q-value no transition ever constrains (and the reverse at a round start): a bootstrap from
    untrained outputs, which let DoubleDQN's value estimates drift upward (measured: initial-state value 0.4
    -> 3.7 over 10k steps, replayed speed 1.05x / 1.30x over two seeds). The subclasses take the greedy action (the
    target's and ``predict``'s; DiscreteBCQ's imitator-filtered rule) and CQL's logsumexp over the valid actions
    only; ``RLPolicy`` already acts so. The phase is the first feature (``phase_start``), read from the standardised
    observations above ``phase_threshold`` (its raw 0.5). Built on first use (d3rlpy is imported lazily)."""
    from d3rlpy.algos.qlearning.torch import DiscreteBCQImpl, DiscreteCQLImpl, DoubleDQNImpl

    class ValidActions:
        _valid_masks: torch.Tensor  # [2, A] bool: the actions valid in a draft, at a round start
        _phase_threshold: float

        def restrict(self, masks: np.ndarray, phase_threshold: float) -> None:
            self._valid_masks = torch.from_numpy(masks).to(self.device)
            self._phase_threshold = phase_threshold

        def valid(self, x: torch.Tensor) -> torch.Tensor:  # [B, F] standardised -> [B, A] bool
            return self._valid_masks[(x[:, 0] > self._phase_threshold).long()]

        def inner_predict_best_action(self, x: torch.Tensor) -> torch.Tensor:
            return self._q_func_forwarder.compute_expected_q(x).masked_fill(~self.valid(x), -math.inf).argmax(dim=1)

    class ValidDoubleDQNImpl(ValidActions, DoubleDQNImpl):
        pass

    class ValidDiscreteCQLImpl(ValidActions, DiscreteCQLImpl):
        def _compute_conservative_loss(self, obs_t: torch.Tensor, act_t: torch.Tensor) -> torch.Tensor:
            q = self._q_func_forwarder.compute_expected_q(obs_t)
            lse = torch.logsumexp(q.masked_fill(~self.valid(obs_t), -math.inf), dim=1)
            return (lse - q.gather(1, act_t.view(-1, 1)).squeeze(1)).mean()

    class ValidDiscreteBCQImpl(ValidActions, DiscreteBCQImpl):
        def inner_predict_best_action(self, x: torch.Tensor) -> torch.Tensor:
            # d3rlpy's rule (imitator filter, shifted Q), over the valid actions
            ok = self.valid(x)
            lp = F.log_softmax(self._modules.imitator(x).logits.masked_fill(~ok, -math.inf), dim=1)
            keep = ok & (lp - lp.max(dim=1, keepdim=True).values > math.log(self._action_flexibility))
            q = self._q_func_forwarder.compute_expected_q(x)
            q = q - q.masked_fill(~keep, math.inf).min(dim=1, keepdim=True).values + 1e-5
            return (q * keep).argmax(dim=1)

    return {"DoubleDQN": ValidDoubleDQNImpl, "DiscreteCQL": ValidDiscreteCQLImpl, "DiscreteBCQ": ValidDiscreteBCQImpl}


@functools.cache
def all_action_impls() -> dict[str, type]:
    """lede's subclasses of the valid-action learners (``valid_action_impls``) for full-information data
    (``lede.rl.counterfactual``): each sampled round start is fitted on the transitions of *every* action there,
    not only of the one action the transition picker drew.

    Why. d3rlpy's loss reads one (s, a, r, s') per sampled transition, so on full-information data a minibatch of B
    round starts constrains B of the B × A action values it could; over a 10k-step run of batch 256 on 33k round
    starts × 57 actions each action value was fitted ~1.4 times, where FullInfo (least squares on the whole vector)
    fits each 30 times. Here the Double-DQN target y_a = r_a + γ · (1 − done_a) · Q_targ(s'_a, argmax_a' Q(s'_a, a'))
    is computed for every a (B × A next states through the target network) and the Huber loss averages over all of
    them; DiscreteCQL adds its conservative term on the drawn action as before. The picker
    (``CounterfactualPicker``) carries the round start's row in the transition's ``next_action``, which d3rlpy's
    discrete Q-learners never read; ``attach`` gives the impl the data's rewards (scaled as d3rlpy scales the
    minibatch's), next states and terminal flags, indexed by that row."""
    from d3rlpy.algos.qlearning.torch.cql_impl import DiscreteCQLLoss
    from d3rlpy.algos.qlearning.torch.dqn_impl import DQNLoss

    valid = valid_action_impls()

    class AllActions:
        _all_rewards: torch.Tensor  # [R, A] scaled
        _all_next: torch.Tensor  # [R, A, F] standardised next states
        _all_done: torch.Tensor  # [R, A] float: 1 where action a ends the generation

        def attach(self, rewards: np.ndarray, next_obs: np.ndarray, terminal: np.ndarray) -> None:
            self._all_rewards = torch.from_numpy(np.ascontiguousarray(rewards, dtype=np.float32)).to(self.device)
            self._all_next = torch.from_numpy(np.ascontiguousarray(next_obs, dtype=np.float32)).to(self.device)
            self._all_done = torch.from_numpy(terminal.astype(np.float32)).to(self.device)

        def _rows(self, batch) -> torch.Tensor:
            return batch.next_actions.view(-1).long()

        def compute_target(self, batch) -> torch.Tensor:  # [B, A]: Q_targ(s'_a, argmax Q(s'_a)) for every a
            with torch.no_grad():
                nxt = self._all_next[self._rows(batch)]  # [B, A, F]
                flat = nxt.reshape(-1, nxt.shape[-1])  # [B·A, F]
                best = self.inner_predict_best_action(flat)
                q = self._targ_q_func_forwarder.compute_target(flat, best, reduction="min")  # [B·A, 1]
                return q.view(nxt.shape[0], nxt.shape[1])

        def _td_loss(self, batch, q_tpn: torch.Tensor) -> torch.Tensor:
            rows = self._rows(batch)
            q = self._q_func_forwarder.compute_expected_q(batch.observations)  # [B, A]
            y = self._all_rewards[rows] + self._gamma * (1.0 - self._all_done[rows]) * q_tpn
            return F.huber_loss(q, y, delta=1.0)  # d3rlpy's compute_huber_loss, averaged over every (s, a)

        def compute_loss(self, batch, q_tpn: torch.Tensor):
            return DQNLoss(loss=self._td_loss(batch, q_tpn))

    class AllActionsDoubleDQNImpl(AllActions, valid["DoubleDQN"]):
        pass

    class AllActionsDiscreteCQLImpl(AllActions, valid["DiscreteCQL"]):
        def compute_loss(self, batch, q_tpn: torch.Tensor):
            td = self._td_loss(batch, q_tpn)
            conservative = self._compute_conservative_loss(batch.observations, batch.actions.long())
            return DiscreteCQLLoss(loss=td + self._alpha * conservative, td_loss=td, conservative_loss=conservative)

    return {"DoubleDQN": AllActionsDoubleDQNImpl, "DiscreteCQL": AllActionsDiscreteCQLImpl}


def _restrict_to_valid_actions(model, algo: str, space: ActionSpace, phase_threshold: float) -> None:
    """Make the built d3rlpy learner an instance of lede's subclass of its implementation class
    (``valid_action_impls``): the same state, the subclass's methods. The config builds d3rlpy's own class and d3rlpy
    has no hook to choose another, hence the class change right after ``build_with_dataset``."""
    cls = valid_action_impls()[algo]
    if type(model.impl) is not cls.__mro__[2]:  # [cls, ValidActions, d3rlpy's class, ...]
        raise PolicyError(f"d3rlpy built a {type(model.impl).__name__} for {algo}, not the {cls.__mro__[2].__name__} "
                          "lede's valid-action subclass extends: check the d3rlpy version (pyproject.toml)")
    model.impl.__class__ = cls
    model.impl.restrict(space.valid_masks(np.array([False, True])), phase_threshold)


def train_policy(
    exp: Experience, algo: str = "DiscreteCQL", seed: int = 0, n_steps: int = 20000, n_steps_per_epoch: int = 2000,
    log_dir: str | Path = "results/rl/logs", run_name: str | None = None, batch_size: int = 256, gamma: float = 0.99,
    lr: float = 3e-4, fqe_steps: int = 5000, fqe_epoch_steps: int = 0, eval_episodes: int = 256, progress: bool = False,
    hidden_units: Sequence[int] = (64, 64), target_update_interval: int = 1000, cql_alpha: float = 0.3,
    decision: str = "token", valid_only: bool = True, discount: str = "decision", reward_scale: float = 1.0,
    all_actions: bool = True,
) -> TrainResult:
    """Fit ``algo`` on the logged experience (features standardised with the dataset's mean/std);
    evaluate TD error and the estimated initial-state value per epoch, and the final policy's value
    with FQE (``off_policy_value``; ``fqe_steps=0`` leaves it for later, e.g. for the one restart that is kept:
    FQE's 5000 steps took 46 s of the .test config's 118 s job with two restarts). ``fqe_epoch_steps`` > 0 adds
    the off-policy estimate per epoch (``fqe_initial_state_value``; ``EpochFQE``: one FQE continued by that many
    steps at each epoch's end, the training unchanged by it). The per-epoch metrics read
    a fixed, evenly strided sample of ``eval_episodes`` episodes (all of them if fewer): over a million
    replayed decisions, evaluating every episode each epoch took longer than the training itself.

    ``gamma``: the discount (per decision with ``discount="decision"``, this function's default, 0.99; the
    workflow's defaults are ``policy.discount: round`` and ``policy.gamma: 0.9``, validated later); ``cql_alpha``:
    DiscreteCQL's conservative-loss weight (d3rlpy's ``alpha``), 0.3. Both chosen by replay on a validation part
    of the dev split; why a per-decision discount well below 1 penalises drafting: ``lede.rl.features``, *Discount*.

    ``hidden_units``: the Q-network's (and BC/BCQ imitator's) hidden layer widths. Small by default because
    the network runs at every decision inside the decoding loop: d3rlpy's default 256 x 256 (~75k float32
    weights, 300 kB) falls out of the CPU caches during each model forward and cost ~100 us per decision in
    the loop (18 us isolated); 64 x 64 is ~4k weights.

    ``target_update_interval``: gradient steps between copies of the Q-network into the target network that
    the Bellman targets read. d3rlpy's default, 8000, left a 10k-step run with one copy, so its targets were
    mostly the random initial network's: measured by replay on the 30 held-out sequences (DiscreteCQL, 10k
    steps, γ 0.9, seed 0 of the default pipeline's experience) 1.64x plain with 8000, 1.72x with 1000; another
    seed reached 1.98x / 1.99x either way (replayed on the corrupted sequences, see ``gamma``). It must be at
    most ``n_steps``.

    ``decision``: ``"token"`` learns the paper's process (stop / one more after every draft); ``"round"`` learns on
    ``exp.per_round()`` — one decision per round, (drafter, K) together — and ``gamma`` is then per round.

    ``valid_only``: the Bellman target's greedy action and DiscreteCQL's penalty range over the actions valid in
    the state's phase (``valid_action_impls``); False is d3rlpy as shipped (every action everywhere),
    an ablation.

    ``discount``: ``"decision"`` discounts every decision by ``gamma``; ``"round"`` only the decision that ends a
    round (``RoundDiscount``), so drafting one more token is not taxed (``lede.rl.features``, *Discount*). The
    per-epoch ``td_error`` metric (d3rlpy's evaluator) still discounts per decision.

    ``reward_scale``: rewards are multiplied by it before fitting (d3rlpy's ``MultiplyRewardScaler``); the greedy
    policy is unchanged by a positive scale, the fit is not. d3rlpy fits Q-values with a Huber loss of width 1
    (``compute_huber_loss``), which is quadratic — mean-seeking — only for residuals below 1. A round's reward
    here spreads over several units (a lookup round of K = 4 pays −0.6 when its first draft is wrong and 3.4
    when all four are right), so with rewards as they are the fit leans toward the *median* outcome and
    undervalues exactly the long, all-or-nothing drafts (a Huber estimate of 0.26 where the mean is 1.24 for
    that round at 45% all-right). Scaled so the residuals stay inside the quadratic range, the loss estimates
    the expected return, which is what the greedy policy needs (``tests/test_rl.py`` shows both on a bandit). On the
    real experience it did not help: replayed on the dev split's validation part (DoubleDQN, γ 0.9 per round, 10k
    steps, two seeds) 1.268× / 1.333× unscaled, 1.246× / 1.247× with 0.1, 1.249× / 1.218× with 0.25 (static lookup
    K3 1.349×), so the default stays 1 (``policy.reward_scale``). Full-information data (``lede.rl.counterfactual``,
    ``<algo>-FI``) is the exception: there every long draft's outcome is at every state, and unscaled DoubleDQN-FI
    chose lookup K1 over K8 (replayed 1.16×); its rewards are multiplied by ``FULL_INFO_REWARD_SCALE`` (0.1) as well.

    ``all_actions`` (full-information data, DoubleDQN and DiscreteCQL): fit every action's transition of each
    sampled round start (``all_action_impls``); False fits the one action the picker draws, d3rlpy's loss as
    shipped (an ablation). Needs ``valid_only``."""
    import d3rlpy
    from d3rlpy.metrics import InitialStateValueEstimationEvaluator, TDErrorEvaluator

    if decision not in DECISIONS:
        raise ValueError(f"decision={decision!r}: use one of {', '.join(DECISIONS)} (policy.decision)")
    exp.check()
    exp = exp.for_decision(decision)
    if eval_episodes < 1:
        raise ValueError(f"eval_episodes={eval_episodes} must be >= 1")
    if algo != "DiscreteBC" and not 1 <= target_update_interval <= n_steps:
        raise ValueError(f"target_update_interval={target_update_interval} with n_steps={n_steps}: the target "
                         "network would never be updated; set it between 1 and n_steps (policy.target_update_interval)")
    if not exp.meta.get("model"):
        raise PolicyError("the experience does not say which model it was collected with (meta['model']): "
                          "collect it with collect_experience")
    full_info = bool(exp.meta.get("full_information"))
    if full_info:  # every action's outcome at every state: keep the Huber loss mean-seeking (FULL_INFO_REWARD_SCALE)
        reward_scale = reward_scale * FULL_INFO_REWARD_SCALE
    all_actions = bool(all_actions and full_info and algo in all_action_impls())
    if all_actions and not valid_only:
        raise PolicyError("all_actions (every action's transition of full-information data) extends the valid-action "
                          "learners: use valid_only=True or all_actions=False")
    d3rlpy.seed(seed)
    mean = exp.obs.mean(0)
    std = exp.obs.std(0) + 1e-6
    scaled = exp.standardised(mean, std)
    if exp.names[0] != "phase_start":
        raise PolicyError(f"the experience's first feature is {exp.names[0]!r}, not phase_start")
    phase = (0.5 - float(mean[0])) / float(std[0])  # the standardised phase_start above which a row is a round start
    dataset = scaled.mdp_dataset(discount, phase)
    model = _algo_config(algo, batch_size, gamma, lr, hidden_units, target_update_interval, cql_alpha,
                         reward_scale).create(device="cuda:0" if torch.cuda.is_available() else "cpu:0")
    run_name = run_name or f"{algo}_s{seed}"
    model.build_with_dataset(dataset)
    if valid_only and algo != "DiscreteBC":
        _restrict_to_valid_actions(model, algo, exp.space, phase)
    if all_actions:
        model.impl.__class__ = all_action_impls()[algo]
        model.impl.attach(scaled.rewards * reward_scale, scaled.next_obs, scaled.terminal)
    logger = d3rlpy.logging.FileAdapterFactory(root_dir=str(log_dir))
    sample = dataset.episodes[:: max(1, math.ceil(len(dataset.episodes) / eval_episodes))]
    evaluators = {"td_error": TDErrorEvaluator(sample),
                  "initial_state_value": InitialStateValueEstimationEvaluator(sample)}
    if fqe_epoch_steps > 0:
        evaluators["fqe_initial_state_value"] = EpochFQE(fqe_epoch_steps, gamma, sample)
    if algo == "DiscreteBC":
        evaluators = {}  # BC has no Q-function
    history = []
    for epoch, metrics in model.fitter(dataset, n_steps=n_steps, n_steps_per_epoch=n_steps_per_epoch,
                                       experiment_name=run_name, with_timestamp=False, logger_adapter=logger,
                                       show_progress=progress, evaluators=evaluators, save_interval=10**9):
        history.append({"epoch": epoch, **{k: float(v) for k, v in metrics.items()}})
    net, imitator = _export(model, algo)
    info = {"transitions": exp.transitions, "round_starts" if full_info else "decisions": len(exp),
            "full_information": full_info, "episodes": len(exp.behaviour), "eval_episodes": len(sample), "n_steps": n_steps,
            "gamma": gamma, "target_update_interval": target_update_interval, "hidden_units": [int(h) for h in hidden_units],
            "cql_alpha": cql_alpha if algo == "DiscreteCQL" else None, "reward_weight": exp.meta.get("reward_weight"),
            "reward_credit": exp.meta.get("reward_credit"), "decision": decision, "valid_only": valid_only,
            "discount": discount, "reward_scale": reward_scale, "all_actions": all_actions, "fqe_epoch_steps": fqe_epoch_steps,
            "fqe_initial_state_value": None}
    if imitator is not None:
        info["action_flexibility"] = float(model.config.action_flexibility)
    pf = PolicyFile(model=exp.meta["model"], exit_layers=list(exp.space.exit_layers),
                    max_draft_len=exp.space.max_draft_len, features=exp.names, mean=mean.tolist(), std=std.tolist(),
                    algo=algo, seed=seed, q_net=net, info=info, imitator=imitator, decision=decision)
    # the exported networks must act as d3rlpy's own policy does (over the valid actions, or all of them as
    # d3rlpy as shipped sees them)
    states = exp.obs[:: max(1, len(exp) // 512)]
    allowed = (exp.space.valid_masks(states[:, 0] > 0.5) if valid_only and algo != "DiscreteBC"
               else np.ones(exp.space.size, dtype=bool))
    ours = RLPolicy(pf).choose(states, allowed)
    theirs = model.predict(((states - mean) / std).astype(np.float32))
    if (agree := float((ours == theirs).mean())) < 0.99:  # float32 ties aside
        raise PolicyError(f"exported {algo} policy agrees with d3rlpy's on only {agree:.1%} of states: export bug")
    res = TrainResult(pf, history, None, model, dataset, sample)
    if fqe_steps > 0:
        off_policy_value(res, fqe_steps, log_dir, f"{run_name}_fqe", progress)
    return res


def off_policy_value(res: TrainResult, steps: int = 5000, log_dir: str | Path = "results/rl/logs",
                     run_name: str = "fqe", progress: bool = False) -> float | None:
    """The fitted policy's estimated initial-state value by fitted Q evaluation (d3rlpy's ``DiscreteFQE``,
    ``steps`` gradient steps, the policy's own γ), stored in ``res.fqe_value`` and the policy file's info.
    None for DiscreteBC, which has no Q-function (train_policy never ran FQE for it)."""
    import d3rlpy
    from d3rlpy.metrics import InitialStateValueEstimationEvaluator

    if res.fitted is None:
        raise PolicyError("off_policy_value needs the TrainResult of train_policy (a loaded policy file holds no "
                          "d3rlpy algorithm)")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if res.policy.algo == "DiscreteBC":
        return None
    gamma = res.policy.info["gamma"]
    fqe = _fqe(res.fitted, gamma)
    fqe.fit(res.dataset, n_steps=steps, n_steps_per_epoch=steps, experiment_name=run_name, with_timestamp=False,
            logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=str(log_dir)), show_progress=progress,
            save_interval=10**9, evaluators={"fqe_initial_state_value": InitialStateValueEstimationEvaluator(res.sample)})
    res.fqe_value = float(InitialStateValueEstimationEvaluator(res.dataset.episodes)(fqe, res.dataset))
    res.policy.info["fqe_initial_state_value"] = res.fqe_value
    return res.fqe_value


def _export(model, algo: str) -> tuple[nn.Sequential, nn.Sequential | None]:
    """Plain torch MLPs equal to d3rlpy's Q-function (BC: its logits, which rank the actions the same way)
    and, for DiscreteBCQ, its imitator, for fast per-decision inference."""
    impl = model.impl

    def copy(encoder, fc) -> nn.Sequential:
        linears = [m for m in encoder._layers if isinstance(m, nn.Linear)] + [fc]
        net = _mlp([linears[0].in_features] + [l.out_features for l in linears])
        for dst, src in zip([m for m in net if isinstance(m, nn.Linear)], linears):
            dst.load_state_dict(src.state_dict())
        return net.cpu().eval()

    if algo == "DiscreteBC":
        return copy(impl.modules.imitator._encoder, impl.modules.imitator._fc), None
    q = impl.q_function[0] if isinstance(impl.q_function, nn.ModuleList) else impl.q_function
    imitator = None
    if algo == "DiscreteBCQ":
        imitator = copy(impl.modules.imitator._encoder, impl.modules.imitator._fc)
    return copy(q._encoder, q._fc), imitator
