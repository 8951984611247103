"""Rule early_exit: train the early-exit variant's deltas on the base model's own continuations."""

import logging

from lede.study import load_lm, setup

p = setup(snakemake)  # noqa: F821
from lede.drafters.distill import data_hash  # noqa: E402
from lede.drafters.distill import load_teacher  # noqa: E402
from lede.drafters.early_exit import Recipe, save_early_exit, train_early_exit  # noqa: E402

seqs, meta = load_teacher(snakemake.input.data)  # noqa: F821
if meta["model"] != p.model:
    raise SystemExit(f"teacher data {snakemake.input.data} was made by {meta['model']!r}, not {p.model!r}: rerun early_exit_data")  # noqa: F821
lm = load_lm(p, kernels="torch")  # training needs autograd-friendly linears
recipe = Recipe(**dict(p.recipe))
result = train_early_exit(lm, seqs, recipe, data_hash=data_hash(seqs), checkpoint=p.checkpoint,
                          checkpoint_every=p.checkpoint_every, budget_s=60.0 * p.budget_minutes)
if result.stopped_by_budget:
    logging.warning("early_exit.budget_minutes=%s bought %d of %d steps (learning rate decayed over %d): the artefact "
                    "records it; raise the budget to train longer (an interrupted run resumes from %s)",
                    p.budget_minutes, result.steps_done, recipe.steps, result.horizon, p.checkpoint)
tail = result.loss_curve[-20:]
logging.info("%d steps in %.0f s; mean loss of the last %d steps: %s", result.steps_done, result.seconds, len(tail),
             {k: round(sum(r[k] for r in tail) / len(tail), 4) for k in tail[0] if k not in ("step", "lr")} if tail else {})
save_early_exit(snakemake.output[0], result)  # noqa: F821
