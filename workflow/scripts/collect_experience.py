"""Rule collect_experience: behaviour policies (best static cells, random schedules, ε-perturbed
heuristics, plain decoding) with the real engine on training prompts; every decision logged."""

import logging

from lede.study import behaviour_policies, decoder_from_selection, load_costs, policy_train_prompts, setup

p = setup(snakemake)  # noqa: F821
from lede.rl.offline import collect_experience  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
pol, col = p.policy, p.policy["collect"]
kmax = pol["max_draft_len"]
lm, dec = decoder_from_selection(p, inp.heads[0], kmax, costs_path=inp.heads[1])  # the cost model's kernels
costs = load_costs(inp.heads[1], inp.heads[0], lm)
space, behaviours = behaviour_policies(p, inp.sweep, costs, col["static_cells"], col["random"])
logging.info("behaviour policies: %s", [b.name for b in behaviours])
prompts = policy_train_prompts(p, col["per_category"], extra_gsm8k=col["per_category"])  # none the adapters saw
items = [(pr.uid, pr.category, lm.encode_chat(pr.text)) for pr in prompts]
logging.info("%d training prompts x %d behaviours", len(items), len(behaviours))
exp = collect_experience(dec, items, behaviours, space, costs, col["max_new_tokens"], pol["reward_weight"],
                         pol["reward_credit"])
logging.info("%d transitions in %d episodes", len(exp), len(exp.behaviour))
exp.save(out[0].removesuffix(".parquet"))
