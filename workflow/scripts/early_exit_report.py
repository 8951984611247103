"""Rule early_exit_report: base model vs its early-exit variant on the evaluation prompts."""

import json
import logging

from lede.study import load_lm, setup

p = setup(snakemake)  # noqa: F821
from lede.drafters.distill import Sequence, greedy_continuations  # noqa: E402
from lede.drafters.distill import load_teacher  # noqa: E402
from lede.drafters.early_exit import read_early_exit, teacher_forced_agreement  # noqa: E402
from lede.core.io import atomic_write_text  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
base_seqs, meta = load_teacher(inp.teacher)
blob = read_early_exit(inp.weights)
ee = blob["meta"]
vocab = blob["vocab"]
layers = sorted(set(p.layers) | set(ee["recipe"]["exit_layers"]))
base = load_lm(p)  # these rules' params name the base model (common_params(base=True))
variant = load_lm(p, early_exit_weights=inp.weights)

# the variant's own greedy continuations of the same prompts (its exits are drafted against these)
conts = greedy_continuations(variant, [s.prompt_ids for s in base_seqs], p.max_new_tokens, batch_size=p.batch_size)
own_seqs = [Sequence(s.prompt_ids, c, s.category, s.uid) for s, c in zip(base_seqs, conts)]
rows = {
    "base": teacher_forced_agreement(base, base_seqs, layers, vocab),  # base exits vs base tokens
    "variant": teacher_forced_agreement(variant, own_seqs, layers, vocab),  # variant exits vs its own tokens
    "variant_on_base": teacher_forced_agreement(variant, base_seqs, layers, vocab),  # variant vs base tokens
}
# the same measure on as many of the variant's TRAINING sequences: far above the held-out value = the exits
# learned their training sequences rather than the model (more, broader teacher data is the lever)
train_all = load_teacher(inp.train)[0]
train_seqs = train_all[::max(1, len(train_all) // len(base_seqs))][:len(base_seqs)]  # spread over its categories
gap = {"held_out": rows["variant_on_base"], "training": teacher_forced_agreement(variant, train_seqs, layers, vocab)}
cats = sorted({s.category for s in base_seqs})


def cell(agree, cat=None):
    lo, hi = agree.interval(cat)
    return {"rate": agree.rate(cat), "low": lo, "high": hi}


result = {
    "base_model": p.model, "variant": p.model + "-ee", "vocab_size": len(vocab) if vocab else None,
    "recipe": ee["recipe"], "steps_done": ee["steps_done"], "stopped_by_budget": ee["stopped_by_budget"],
    "horizon": ee.get("horizon", 0), "train_seconds": ee["seconds"], "prompts": len(base_seqs),
    "exit_agreement": {name: {str(l): {c or "all": cell(rows[name][l], c) for c in [None, *cats]} for l in layers}
                       for name in ("base", "variant")},
    "token_agreement_with_base": {c or "all": cell(rows["variant_on_base"]["final"], c) for c in [None, *cats]},
    "fit_gap": {name: {str(k): cell(a[k]) for k in a} for name, a in gap.items()},
    "fit_gap_training_prompts": len(train_seqs),
}


def fmt(c):
    return f"{c['rate']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"


lines = [f"# Early-exit variant `{p.model}-ee` vs base `{p.model}`", "",
         f"{len(base_seqs)} evaluation prompts, greedy continuations of {p.max_new_tokens} tokens; exits use the "
         f"shared final norm + LM head over a {result['vocab_size'] or 'full'}-token draft vocabulary. "
         f"Training: {ee['steps_done']}/{ee['recipe']['steps']} steps in {ee['seconds'] / 60:.1f} min"
         + (f" (**cut by its budget** of {ee['recipe']['steps']}; learning rate decayed over {ee.get('horizon') or '?'} steps)"
            if ee["stopped_by_budget"] else "") + ". 95% bootstrap intervals over prompts.", "",
         "## Exit agreement with each model's own greedy token", "",
         "| layer | base | variant | variant / base |", "|---:|---:|---:|---:|"]
for l in layers:
    b, v = result["exit_agreement"]["base"][str(l)]["all"], result["exit_agreement"]["variant"][str(l)]["all"]
    mark = " (trained exit)" if l in ee["recipe"]["exit_layers"] else ""
    ratio = f"{v['rate'] / b['rate']:.2f}×" if b["rate"] > 0 else "—"
    lines.append(f"| {l}{mark} | {fmt(b)} | {fmt(v)} | {ratio} |")
lines += ["", "Per category (variant, trained exits):", "", "| category | " + " | ".join(f"L{l}" for l in ee["recipe"]["exit_layers"]) + " |",
          "|---|" + "---:|" * len(ee["recipe"]["exit_layers"])]
for c in cats:
    lines.append(f"| {c} | " + " | ".join(f"{result['exit_agreement']['variant'][str(l)][c]['rate']:.3f}"
                                           for l in ee["recipe"]["exit_layers"]) + " |")
lines += ["", "## Quality cost: the variant's greedy token vs the base model's (teacher-forced on the base's text)", "",
          "| category | agreement |", "|---|---:|"]
for c in ["all", *cats]:
    lines.append(f"| {c} | {fmt(result['token_agreement_with_base'][c])} |")
lines += ["", f"## Fit: agreement with the base model's greedy tokens, {len(train_seqs)} training vs {len(base_seqs)} "
          "held-out sequences", "", "Exits and final layer of the variant, teacher-forced on the base model's text. A "
          "training value far above the held-out one means the training sequences were learned, not the model.", "",
          "| | " + " | ".join("final" if k == "final" else f"L{k}" for k in gap["held_out"]) + " |",
          "|---|" + "---:|" * len(gap["held_out"])]
for name, a in (("training", gap["training"]), ("held-out", gap["held_out"])):
    lines.append(f"| {name} | " + " | ".join(f"{a[k].rate():.3f}" for k in a) + " |")
atomic_write_text(out.json, json.dumps(result, indent=1))
atomic_write_text(out.md, "\n".join(lines) + "\n")  # last: the rule's report output
logging.info("\n%s", "\n".join(lines))
