"""Rule replay_experience: extra experience by teacher-forced replay of the dev split's sequences (training
prompts the exit adapters were never distilled on) for behaviour policies that do not read the draft
confidence; see src/lede/rl/replay.py."""

import logging

from lede.study import behaviour_policies, load_costs, replayed_split, setup

p = setup(snakemake)  # noqa: F821
from lede.rl.offline import collect_experience  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
pol, rep = p.policy, p.policy["replay"]
kmax = pol["max_draft_len"]
split = replayed_split(p, inp.heads[0], inp.distill, "dev", kmax,
                       "replay only the dev split's sequences (training prompts the adapters were not distilled on)")
seqs, replay = split.sequences, split.decoder
costs = load_costs(inp.heads[1], inp.heads[0])
space, behaviours = behaviour_policies(p, inp.sweep, costs, rep["static_cells"], rep["random"], random_seed=100,
                                       confidence=False)
logging.info("behaviour policies: %s", [b.name for b in behaviours])
items = [(s.uid, s.category, s.prompt_ids) for s in split.replayable()]
budget = max(len(s.continuation) for s in seqs)  # each episode runs to its stored continuation's end
logging.info("%d training sequences x %d behaviours (replayed, up to %d tokens each)", len(items), len(behaviours), budget)
exp = collect_experience(replay, items, behaviours, space, costs, budget, pol["reward_weight"], pol["reward_credit"])
r = exp.meta["replay"]
logging.info("%d transitions in %d episodes; %d of %d decisions (%.1f%%) after a wrong draft saw the teacher-forced "
             "draft confidence", len(exp), len(exp.behaviour), r["approx_decisions"], r["decisions"],
             100 * r["approx_decisions"] / max(r["decisions"], 1))
exp.save(out[0].removesuffix(".parquet"))
