"""Rule evaluate: every method interleaved on held-out prompts; LEDE's ratios against each."""

import logging
import math
import statistics
from collections import Counter
from dataclasses import asdict

from lede.study import baseline_policy, bench_journal, best_static_cell, exit_layers, decoder_from_selection, load_costs, policy_train_prompts, prompts_for, setup

p = setup(snakemake)  # noqa: F821
import torch  # noqa: E402

from lede.eval.bench import HF_GENERATE, HF_PROMPT_LOOKUP, PLAIN, BenchPrompt, format_summary, run_bench, summarize, write_json  # noqa: E402
from lede.core.costs import pricing_ratios  # noqa: E402
from lede.core.io import atomic_write_text  # noqa: E402
from lede.rl.heuristics import ConfidenceThreshold, tune_threshold  # noqa: E402
from lede.rl.oracle import Oracle, oracle_runs  # noqa: E402
from lede.core.policy import Autoregressive, drafter_name  # noqa: E402
from lede.data import NEW_SOURCES, in_report_group  # noqa: E402
from lede.rl.offline import RLPolicy  # noqa: E402
from lede.rl.online import OnlineFloor, PromptCorrection  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
pol, ev = p.policy, p.policy["evaluate"]
kmax = pol["max_draft_len"]
lm, dec = decoder_from_selection(p, inp.heads[0], kmax, costs_path=inp.heads[1])  # the cost model's kernels
costs = load_costs(inp.heads[1], inp.heads[0], lm)
best_cell = best_static_cell(inp.heads[2], kmax)  # prompt lookup (layer 0) included
best_l, best_k = best_static_cell(inp.heads[2], kmax, exits_only=True)  # the threshold heuristic's exit cell

# the confidence threshold is tuned on TRAINING prompts the adapters were not distilled on (a short real-engine
# run per candidate: 32 tokens, or the evaluation's budget where that is shorter)
tune_prompts = [lm.encode_chat(pr.text) for pr in policy_train_prompts(p, 1)]
tune_tokens = min(32, ev["max_new_tokens"])


def tokens_per_s(threshold):
    policy = ConfidenceThreshold(best_l, threshold, kmax)
    return statistics.median(dec.generate(ids, policy, max_new_tokens=tune_tokens).tokens_per_s for ids in tune_prompts)


# an interrupted evaluation resumes from its journal, with the threshold it tuned (tuning times runs: a rerun may differ)
journal = bench_journal(snakemake, out.json)  # noqa: F821
kernels = journal.kernels(lm)  # a resumed run re-applies the kernels `auto` chose first (before any timing)
threshold = journal.meta.get("threshold") or tune_threshold([0.3, 0.5, 0.7, 0.9], tokens_per_s)
journal.begin(threshold=threshold, **kernels)
if journal.done:
    logging.info("resuming from %s: %d prompts done", journal.path, len(journal.done))
logging.info("best static %s; best exit cell L=%d K=%d; tuned confidence threshold %.2f", best_cell, best_l, best_k,
             threshold)

lede = {}
for path in inp.policies:
    policy = RLPolicy.load(path, lm_name=lm.name, exit_layers=p.layers)
    lede[policy.name] = policy
    if policy.pf.algo in ev.get("online", []):  # the online floor as an ablation (src/lede/rl/online.py)
        floored = OnlineFloor(policy, costs)
        lede[floored.name] = floored
    if policy.pf.algo in ev.get("correct", []):  # the per-prompt correction as an ablation (FullInfo only)
        corrected = PromptCorrection(policy, costs)
        lede[corrected.name] = corrected
oracle_layers = list(p.layers)


def oracle_for(bp):
    cont = dec.generate(list(bp.ids), Autoregressive(), max_new_tokens=ev["max_new_tokens"]).token_ids
    heads = {l: dec.head(l) for l in exit_layers(p)}
    return Oracle(oracle_runs(lm, heads, list(bp.ids), cont, oracle_layers), costs, kmax)


baselines = {name: baseline_policy(name, p, inp.heads[2], costs, kmax, lm)
             for name in ("best_static", "adaptive_k", "dynamic_exit")}
configs = {HF_GENERATE: HF_GENERATE, HF_PROMPT_LOOKUP: HF_PROMPT_LOOKUP, **baselines,
           "confidence": ConfidenceThreshold(best_l, threshold, kmax), **lede, "oracle": oracle_for}
prompts = prompts_for(p, "eval", ev["per_category"], humaneval=ev.get("humaneval", 0),
                      generalisation=ev.get("generalisation", 0))
# a multi-turn chat of the generalisation set goes whole through the chat template (Prompt.messages)
bench_prompts = [BenchPrompt(pr.uid, pr.category, tuple(lm.encode_chat(pr.messages))) for pr in prompts]
records = run_bench(dec, bench_prompts, configs, max_new_tokens=ev["max_new_tokens"], keep_rounds=True, journal=journal)


def pooled(group, recs):
    """The records of a table row (``lede.data.in_report_group``: the generalisation set pooled in its own row, never
    in "all")."""
    return [r for r in recs if in_report_group(r.category, group)]


overall = summarize(pooled("all", records))
if new_sources := pooled(NEW_SOURCES, records):
    overall |= summarize(new_sources, group=lambda r: NEW_SOURCES)
per_cat = summarize(records, group=lambda r: r.category)


def paired(a, b, recs):
    """Median over prompts of tokens/s of a ÷ tokens/s of b."""
    tps = {(r.prompt, r.config): r.tokens_per_s for r in recs}
    xs = [tps[(q, a)] / tps[(q, b)] for q in {r.prompt for r in recs} if (q, a) in tps and (q, b) in tps]
    return statistics.median(xs) if xs else float("nan")


lines = ["# LEDE vs every method, held-out prompts (interleaved, medians of per-prompt ratios)", "",
         f"model={p.model} dtype={lm.dtype} threads={torch.get_num_threads()} prompts={len(prompts)} "
         f"max_new_tokens={ev['max_new_tokens']} best static {drafter_name(best_cell[0])} K={best_cell[1]} "
         f"(best exit cell L={best_l} K={best_k}) threshold={threshold}", ""]
pricing = pricing_ratios(records, costs)
lines += ["engine time ÷ cost-model time, relative to plain decoding (median over prompts; above 1 the method's rounds "
          "cost more in the engine than the model that priced its training rewards says): "
          + ", ".join(f"{name} {x:.3f}" for name, x in pricing.items() if name != PLAIN), ""]
for name in lede:
    lines.append(f"## {name}")
    cats = list(overall) + sorted({r.category for r in records})
    others = [c for c in configs if c not in lede] + [PLAIN]
    lines.append("| category | " + " | ".join(f"vs {o}" for o in others) + " | fraction of oracle |")
    lines.append("|---|" + "---|" * (len(others) + 1))
    for cat in cats:
        rs = pooled(cat, records)
        frac = paired(name, PLAIN, rs) / paired("oracle", PLAIN, rs)
        lines.append(f"| {cat} | " + " | ".join(f"{paired(name, o, rs):.3f}" for o in others) + f" | {frac:.3f} |")
    mine = [r for r in records if r.config == name]
    choices = Counter((d[0], d[1]) for r in mine for d in r.rounds_detail)
    total = sum(choices.values())
    entropy = -sum(c / total * math.log(c / total) for c in choices.values()) if total else 0.0
    lines += ["", f"policy time: median {100 * statistics.median(r.policy_frac for r in mine):.2f}% of decode time; "
              f"{len(choices)} distinct (exit layer, drafted) choices, entropy {entropy:.2f} nats; "
              f"plain steps {sum(c for (l, _), c in choices.items() if l is None) / max(total, 1):.1%}", ""]
    lines.append("exit layer share per category: ")
    for cat in sorted({r.category for r in mine}):
        cnt = Counter(d[0] for r in mine if r.category == cat for d in r.rounds_detail)
        n = sum(cnt.values())
        lines.append(f"- {cat}: " + ", ".join(f"{'plain' if l is None else 'L' + str(l)} {c / n:.0%}"
                                              for l, c in sorted(cnt.items(), key=lambda x: (x[0] is not None, x[0] or 0))))
    lines.append("")
lines += ["```", format_summary(overall), "", format_summary(per_cat), "```", ""]
text = "\n".join(lines)
logging.info("\n%s", text)
write_json(out.json, {"settings": dict(p), "threshold": threshold, "pricing": pricing, "best_static": list(best_cell), "best_exit_cell": [best_l, best_k],
                      "summary": {g: [asdict(s) for s in rows] for g, rows in (overall | per_cat).items()},
                      "records": [asdict(r) for r in records]})
atomic_write_text(out.md, text)
journal.finish()
