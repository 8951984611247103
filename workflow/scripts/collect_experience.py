"""Rule collect_experience: behaviour policies (best static cells, random schedules, ε-perturbed
heuristics, plain decoding) with the real engine on training prompts; every decision logged."""

import csv
import logging
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import decoder_from_selection, prompts_for, setup  # noqa: E402

p = setup(snakemake)  # noqa: F821
from lede.costs import CostModel  # noqa: E402
from lede.features import ActionSpace  # noqa: E402
from lede.heuristics import AdaptiveDraftLength, ConfidenceThreshold, DynamicExit  # noqa: E402
from lede.policy import Autoregressive, RandomSchedule, Static  # noqa: E402
from lede.rl import EpsilonPerturbed, collect_experience  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
pol, col = p.policy, p.policy["collect"]
kmax = pol["max_draft_len"]
lm, dec = decoder_from_selection(p, inp.heads[0], kmax)
costs = CostModel.load(inp.heads[1])
space = ActionSpace(tuple(p.layers), kmax)

rows = [r for r in csv.DictReader(open(inp.sweep)) if r["category"] == "all" and int(r["draft_len"]) <= kmax]
rows.sort(key=lambda r: -float(r["replay_speedup"]))
cells = [(int(r["layer"]), int(r["draft_len"])) for r in rows[: col["static_cells"]]]
best_l, best_k = cells[0]
behaviours = [Static(l, k) for l, k in cells]
behaviours += [RandomSchedule(list(p.layers), kmax, seed=s, p_plain=0.2) for s in range(col["random"])]
eps = col["epsilon"]
behaviours += [
    EpsilonPerturbed(AdaptiveDraftLength(best_l, initial=min(best_k, kmax), max_len=kmax), space, eps, seed=1),
    EpsilonPerturbed(ConfidenceThreshold(best_l, 0.5, kmax), space, eps, seed=2),
    EpsilonPerturbed(DynamicExit(p.layers, costs, kmax), space, eps, seed=3),
    Autoregressive(),
]
logging.info("behaviour policies: %s", [b.name for b in behaviours])
prompts = prompts_for(p, "train", col["per_category"], extra_gsm8k=col["per_category"])
items = [(pr.uid, pr.category, lm.encode_chat(pr.text)) for pr in prompts]
logging.info("%d training prompts x %d behaviours", len(items), len(behaviours))
exp = collect_experience(dec, items, behaviours, space, costs, col["max_new_tokens"], pol["reward_weight"])
logging.info("%d transitions in %d episodes", len(exp), len(exp.behaviour))
exp.save(out[0].removesuffix(".parquet"))
