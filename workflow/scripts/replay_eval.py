"""Rule replay_eval: every trained LEDE policy, the baselines and the oracle (and, with lookup among the drafters, the
oracle of lookup alone, ``oracle_lookup``) replayed along the held-out
distillation sequences and timed by the cost model (lede.rl.replay.replay_speed): seconds per policy, so that
ablations (algorithms, seeds, reward) are compared on the same sequences before the engine's evaluation."""

import json
import logging

from lede.study import baseline_policy, best_static_cell, load_costs, replayed_split, setup

p = setup(snakemake)  # noqa: F821
from lede.rl.heuristics import ConfidenceThreshold  # noqa: E402
from lede.core.io import atomic_write_text  # noqa: E402
from lede.core.policy import LOOKUP, Autoregressive, Static  # noqa: E402
from lede.rl.replay import ReplayedSpeed, ReplayOracle, replay_speed  # noqa: E402
from lede.rl.offline import RLPolicy  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
kmax = p.max_draft_len
split = replayed_split(p, inp.heads[0], inp.distill, "eval", kmax, "evaluate on held-out sequences only")
lm, seqs, replay = split.lm, split.sequences, split.decoder
costs = load_costs(inp.heads[1], inp.heads[0])
best = best_static_cell(inp.heads[2], kmax)
best_exit = best_static_cell(inp.heads[2], kmax, exits_only=True)
lookup = LOOKUP in p.layers
policies = [Autoregressive()]
policies += [baseline_policy(n, p, inp.heads[2], costs, kmax, split.lm) for n in ("best_static", "adaptive_k", "dynamic_exit")]
policies += [Static(LOOKUP, k) for k in sorted({1, 2, 4, kmax}) if lookup and k <= kmax]
policies += [ConfidenceThreshold(best_exit[0], t, kmax) for t in (0.3, 0.5, 0.7, 0.9)]
for path in inp.policies:
    policies.append(RLPolicy.load(path, lm_name=lm.name, exit_layers=p.layers))
policies.append(ReplayOracle(split.tables, costs, kmax, lookup=lookup))
policies = list({pol.name: pol for pol in policies}.values())  # the best static cell may be a listed lookup cell too
if lookup:  # the best schedule of lookup alone: how much of the oracle's lead is in the exit drafts
    policies.append(ReplayOracle(split.tables, costs, kmax, lookup=True, exits=False))
replayable = split.replayable()
cats = sorted({s.category for s in replayable})
rows = []
prompts = {c: [s.prompt_ids for s in replayable if s.category == c] for c in cats}
prompts_in = {"all": sum(len(v) for v in prompts.values()), **{c: len(v) for c, v in prompts.items()}}
for policy in policies:  # each sequence replayed once; "all" combines the categories
    per_cat = {c: replay_speed(replay, prompts[c], policy, costs, p.max_new_tokens) for c in cats}
    for cat, r in {"all": ReplayedSpeed.combine(list(per_cat.values())), **per_cat}.items():
        rows.append({"policy": policy.name, "category": cat, "sequences": prompts_in[cat], "median": r.median,
                     "aggregate": r.aggregate, "tokens_per_round": r.tokens / r.rounds,
                     "drafted_per_round": r.drafted / r.rounds, "approx_decisions": r.approx_decisions / r.decisions})
    logging.info("%s: replayed median speedup %.3f", policy.name, rows[-1 - len(cats)]["median"])
atomic_write_text(out.json, json.dumps({"costs": inp.heads[1], "sequences": inp.distill, "best_static": list(best),
                                        "rows": rows}, indent=1))
oracle = {r["category"]: r["median"] for r in rows if r["policy"] == "oracle"}
lines = ["# Replayed speedups on held-out sequences (cost model: it ranks policies; the evaluation measures them)",
         "", f"{len(seqs)} sequences, {p.max_new_tokens} tokens, cost model {inp.heads[1]}; median per-sequence "
         "speedup over plain decoding (fraction of the oracle's in brackets); tokens/round; share of decisions that saw an "
         "approximate draft confidence", "",
         "| policy | " + " | ".join(["all", *cats]) + " | tokens/round | approx |",
         "|---|" + "---|" * (len(cats) + 3)]
for name in dict.fromkeys(r["policy"] for r in rows):
    mine = {r["category"]: r for r in rows if r["policy"] == name}
    cells = [f"{mine[c]['median']:.3f} ({mine[c]['median'] / oracle[c]:.2f})" for c in ["all", *cats]]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {mine['all']['tokens_per_round']:.2f} | "
                 f"{mine['all']['approx_decisions']:.1%} |")
atomic_write_text(out.md, "\n".join(lines) + "\n")
