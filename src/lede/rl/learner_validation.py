"""Choose the learner's settings by replay on the dev split, never on an evaluation prompt.

The dev split (``policy.dev_per_category`` training prompts per category that the exit adapters were never
distilled on) is cut in two: the learner trains on the experience logged on its first ``train_per_category``
prompts of each category, and each trained policy is replayed (``lede.rl.replay.replay_speed``, timed by the measured
cost model) along the sequences of the other dev prompts, next to static cells and the oracle. The γ and CQL-α
defaults (``lede.rl.features``, *Discount*; ``config/schema.yaml``) were chosen with it. Run it after the pipeline has
produced ``results/`` (experience, replayed experience, dev sequences, exit heads, cost model):

    python -m lede.rl.learner_validation --results results --model smollm2-135m --model-cache resources/models \\
        --setting DiscreteCQL,gamma=0.9,alpha=1 --setting DiscreteCQL,gamma=0.99,alpha=0.3 --seeds 0 1000

A setting is the algorithm and key=value overrides: ``gamma``, ``alpha``, ``n_steps``, ``target_update_interval``,
``decision=round``, ``timeouts=0`` (budget ends fitted as terminals), ``valid=0`` (d3rlpy's targets and CQL penalty
over every action, not the phase's valid ones), ``discount=round`` (γ per round, ``lede.rl.offline.RoundDiscount``),
``scale=0.1`` (rewards multiplied before fitting, ``train_policy``'s ``reward_scale``), ``data=full`` (every per-round
action's transition at the round starts the FullInfo behaviours visit along the training half's replay,
``lede.rl.counterfactual``, instead of the logged experience; implies ``decision=round``), ``weight=1.5`` (with
``data=full``: the w of its rewards tokens − w · cost), ``every=0`` (with ``data=full``: fit the one action d3rlpy's
sampler draws per round start, not all of them; ``train_policy``'s ``all_actions``). ``FullInfo[,epochs=E][,iters=N]``
is the full-information learner (``lede.rl.fullinfo``), fitted on the training half's replayed sequences from the
round starts of a fixed set of behaviours (static lookup K 1 / 3 / 6, K 1 at the shallowest exit, three random
schedules, plain decoding, the oracle). ``--floor`` and ``--correct KAPPA ...`` replay each learned policy also
under the online floor and (FullInfo) the per-prompt correction (``lede.rl.online``).
Each setting and seed trains for ~1.5–2.5 min on 2 CPU threads (10k steps); the replay tables take ~1.5 min, once.
It runs on the base model's exit heads (not the early-exit variant).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lede.rl.offline import ALGOS, DECISIONS, DISCOUNTS, Experience, RLPolicy, train_policy


@dataclass(frozen=True)
class Setting:
    """One learner configuration: the d3rlpy algorithm and the knobs being validated."""

    algo: str = "DiscreteCQL"
    gamma: float = 0.99
    alpha: float = 0.3  # DiscreteCQL only
    n_steps: int = 10000
    target_update_interval: int = 1000
    decision: str = "token"  # or "round": lede.rl.offline.Experience.per_round
    timeouts: bool = True  # False: fit budget-cut generations as terminals too (Experience.ends; an ablation)
    valid: bool = True  # False: d3rlpy's targets and CQL penalty over every action (train_policy's valid_only)
    discount: str = "decision"  # or "round": γ per round (lede.rl.offline.RoundDiscount)
    scale: float = 1.0  # rewards multiplied by it before fitting (train_policy's reward_scale)
    data: str = "experience"  # or "full": every action's transition at the replayed round starts (lede.rl.counterfactual)
    epochs: int = 30  # FullInfo only (lede.rl.fullinfo): passes per fit
    iters: int = 2  # FullInfo only: refits (rate_iterations)
    weight: float = 1.0  # data=full only: w of the rewards tokens − w · cost (counterfactual_data's reward_weight)
    every: bool = True  # data=full only: fit every action's transition of a round start (train_policy's all_actions)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"DiscreteCQL,gamma=0.99,alpha=0.3,n_steps=10000,decision=round"``: the algorithm, then key=value
        overrides."""
        algo, *pairs = text.split(",")
        if algo not in (*ALGOS, "FullInfo"):
            raise ValueError(f"setting {text!r}: unknown algorithm {algo!r}; use one of {', '.join(ALGOS)}, FullInfo")
        kw: dict = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in ("gamma", "alpha", "n_steps", "target_update_interval", "decision", "timeouts", "valid",
                           "discount", "scale", "data", "epochs", "iters", "weight", "every") or not value:
                raise ValueError(f"setting {text!r}: {pair!r} is not one of gamma=, alpha=, n_steps=, "
                                 "target_update_interval=, decision=, timeouts=, valid=, discount=, scale=, data=, "
                                 "epochs=, iters=, weight=, every=")
            if key in ("timeouts", "valid", "every"):
                if value not in ("0", "1"):
                    raise ValueError(f"setting {text!r}: {key}={value!r} must be 0 or 1")
                kw[key] = value == "1"
            elif key in ("decision", "discount", "data"):
                allowed = {"decision": DECISIONS, "discount": DISCOUNTS, "data": ("experience", "full")}[key]
                if value not in allowed:
                    raise ValueError(f"setting {text!r}: {key}={value!r} is not one of {', '.join(allowed)}")
                kw[key] = value
            else:
                kw[key] = int(value) if key in ("n_steps", "target_update_interval", "epochs", "iters") else float(value)
        if kw.get("data") == "full" and kw.get("decision", "round") != "round":
            raise ValueError(f"setting {text!r}: data=full has one decision per round (decision=round)")
        if kw.get("data") == "full":
            kw["decision"] = "round"
        return cls(algo, **kw)

    @property
    def name(self) -> str:
        if self.algo == "FullInfo":
            return f"FullInfo {self.epochs} epochs {self.iters} refits"
        alpha = f" α{self.alpha:g}" if self.algo == "DiscreteCQL" else ""
        per = " per round" if self.decision == "round" else ""
        cut = "" if self.timeouts else " budget ends terminal"
        every = "" if self.valid else " targets over all actions"
        disc = " γ per round" if self.discount == "round" and self.decision == "token" else ""
        tui = f" target copy every {self.target_update_interval}" if self.target_update_interval != 1000 else ""
        scale = f" rewards ×{self.scale:g}" if self.scale != 1.0 else ""
        full = (f" full-information data{f' w{self.weight:g}' if self.weight != 1.0 else ''}"
                f"{'' if self.every else ' one drawn action per sample'}" if self.data == "full" else "")
        return f"{self.algo}{per} γ{self.gamma:g}{alpha} {self.n_steps} steps{tui}{cut}{every}{disc}{scale}{full}"


def dev_halves(sequences: list, train_per_category: int) -> tuple[set[str], list]:
    """(uids of the first ``train_per_category`` sequences of each category, the other sequences that have a
    continuation): the learner's training prompts and its validation sequences."""
    if train_per_category < 1:
        raise ValueError(f"train_per_category={train_per_category} must be >= 1")
    seen: dict[str, int] = {}
    train: set[str] = set()
    for s in sequences:
        if seen.get(s.category, 0) < train_per_category:
            train.add(s.uid)
        seen[s.category] = seen.get(s.category, 0) + 1
    val = [s for s in sequences if s.uid not in train and s.continuation]
    if not val:
        raise ValueError(f"no validation sequences: every category has at most {train_per_category} dev prompts; "
                         "lower train_per_category or raise policy.dev_per_category")
    return train, val


def experience_of(exp: Experience, prompts: set[str]) -> Experience:
    """The episodes of ``exp`` logged on ``prompts`` (uids), renumbered 0..n-1 in their order."""
    keep_ep = [i for i, p in enumerate(exp.prompt) if p in prompts]
    if not keep_ep:
        raise ValueError("no logged episode is on the training prompts: is this the dev split's experience?")
    new_id = np.full(len(exp.behaviour), -1, dtype=np.int64)
    new_id[keep_ep] = np.arange(len(keep_ep))
    rows = new_id[exp.episode] >= 0

    def pick(xs):
        return [xs[i] for i in keep_ep]

    return Experience(exp.space, exp.names, exp.obs[rows], exp.actions[rows], exp.rewards[rows], exp.terminals[rows],
                      new_id[exp.episode[rows]], pick(exp.behaviour), pick(exp.prompt), pick(exp.category), exp.meta,
                      None if exp.truncated is None else pick(exp.truncated))


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from lede.drafters.distill import load_distill
    from lede.core.engine import Decoder
    from lede.core.exits import load_exit_heads, selected_costs
    from lede.drafters.loading import load_model
    from lede.core.policy import LOOKUP, Static
    from lede.rl.replay import ReplayDecoder, ReplayedSpeed, ReplayOracle, replay_speed, replay_tables

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-cache", default=None)
    ap.add_argument("--setting", action="append", default=[], help="ALGO[,gamma=G][,alpha=A][,n_steps=N] (repeat)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train-per-category", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--floor", action="store_true",
                    help="also replay every learned policy under the online floor (lede.rl.online)")
    ap.add_argument("--correct", type=float, nargs="+", default=None, metavar="KAPPA",
                    help="also replay every FullInfo policy under the per-prompt correction (lede.rl.online."
                         "PromptCorrection) with each prior weight KAPPA (accepted tokens)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "lede_learner_validation")
    a = ap.parse_args(argv)
    settings = [Setting.parse(s) for s in a.setting] or [Setting()]
    torch.set_num_threads(a.threads)
    R = a.results
    selected = R / "exits" / "selected.json"
    exp = Experience.concat([Experience.load(R / "rl" / "experience"), Experience.load(R / "rl" / "replay")])
    seqs, data, meta = load_distill(R / "exits" / "distill_dev.pt")
    if meta.get("split") != "dev":
        raise ValueError(f"{R}/exits/distill_dev.pt holds the {meta.get('split')!r} split, not dev")
    train, val = dev_halves(seqs, a.train_per_category)
    sub = experience_of(exp, train)
    lm = load_model(a.model, dtype="float32", device="cpu", cache_dir=a.model_cache)
    dec = Decoder(lm, exit_heads=load_exit_heads(lm, selected), max_draft_len=exp.space.max_draft_len)
    layers = [l for l in exp.space.exit_layers if l != LOOKUP]
    replay = ReplayDecoder(lm, replay_tables(lm, {l: dec.head(l) for l in layers}, seqs, data), exp.space.max_draft_len)
    costs = selected_costs(R / "costs.json", selected)
    cats = sorted({s.category for s in val})

    def score(policy) -> dict:  # each sequence replayed once; "all" combines the categories (as replay_eval)
        per = {c: replay_speed(replay, [s.prompt_ids for s in val if s.category == c], policy, costs, a.max_new_tokens)
               for c in cats}
        return {"all": ReplayedSpeed.combine(list(per.values())).median, **{c: r.median for c, r in per.items()}}

    def report(row: dict, policy) -> None:
        rows.append(row)
        print(row, flush=True)
        if a.floor:
            from lede.rl.online import OnlineFloor

            rows.append({**row, "policy": row["policy"] + " + online floor", "floor": True,
                         **score(OnlineFloor(policy, costs))})
            print(rows[-1], flush=True)
        if a.correct and isinstance(policy, RLPolicy) and policy.pf.algo == "FullInfo":
            from lede.rl.online import PromptCorrection

            for kappa in a.correct:
                rows.append({**row, "policy": f"{row['policy']} + correction (kappa {kappa:g})", "correct": kappa,
                             **score(PromptCorrection(policy, costs, prior_tokens=kappa))})
                print(rows[-1], flush=True)

    rows = []
    print(f"train: {len(sub)} decisions, {len(sub.behaviour)} episodes on {len(train)} dev prompts; "
          f"validate on {len(val)} dev sequences", flush=True)
    kmax = exp.space.max_draft_len
    refs = [Static(LOOKUP, 3), Static(LOOKUP, 4), ReplayOracle(replay.tables, costs, kmax, lookup=LOOKUP in exp.space.exit_layers)]
    for policy in refs[:-1]:
        report({"policy": policy.name, **score(policy)}, policy)
    rows.append({"policy": refs[-1].name, **score(refs[-1])})  # the oracle: no floor
    print(rows[-1], flush=True)
    train_seqs = [s.prompt_ids for s in seqs if s.uid in train and s.continuation]
    from lede.core.policy import Autoregressive, RandomSchedule

    drafters = list(exp.space.exit_layers)
    # the full-information learners' states: the round starts these visit along the training half's replay
    behaviours = [Static(LOOKUP, 3), Static(LOOKUP, 1), Static(LOOKUP, 6), Static(layers[0], 1),
                  *[RandomSchedule(drafters, kmax, seed=s, p_plain=0.2) for s in range(3)], Autoregressive(), refs[-1]]
    full_data: dict[float, object] = {}  # by reward weight
    for st in settings:
        for seed in a.seeds:
            if st.algo == "FullInfo":  # every action's outcome along the training half's replay (lede.rl.fullinfo)
                from lede.rl.fullinfo import train_full_information

                fit = train_full_information(replay, train_seqs, behaviours, exp.space, costs, a.model, seed=seed,
                                             rate_iterations=st.iters, epochs=st.epochs,
                                             max_new_tokens=a.max_new_tokens)
                report({"policy": st.name, "setting": asdict(st), "seed": seed, **score(RLPolicy(fit.policy))},
                       RLPolicy(fit.policy))
                continue
            data = sub if st.timeouts else replace(sub, truncated=None)
            if st.data == "full":  # every action's transition at the replayed round starts (lede.rl.counterfactual)
                if st.weight not in full_data:
                    from lede.rl.counterfactual import counterfactual_data

                    full_data[st.weight] = counterfactual_data(replay, train_seqs, behaviours, exp.space, costs,
                                                               a.model, reward_weight=st.weight,
                                                               max_new_tokens=a.max_new_tokens)
                    print(f"full-information data (w {st.weight:g}): {len(full_data[st.weight])} round starts, "
                          f"{full_data[st.weight].transitions} transitions", flush=True)
                data = full_data[st.weight]
            res = train_policy(data, algo=st.algo, seed=seed, n_steps=st.n_steps, n_steps_per_epoch=max(st.n_steps // 5, 1),
                               log_dir=a.log_dir, gamma=st.gamma, cql_alpha=st.alpha,
                               target_update_interval=st.target_update_interval, fqe_steps=0, eval_episodes=64,
                               decision=st.decision, valid_only=st.valid, discount=st.discount,
                               reward_scale=st.scale, all_actions=st.every)
            report({"policy": st.name, "setting": asdict(st), "seed": seed, **score(RLPolicy(res.policy))},
                   RLPolicy(res.policy))
    if a.out:
        from lede.core.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
