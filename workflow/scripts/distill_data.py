"""Rule distill_data: greedy continuations of the split's prompts, teacher-forced hidden states."""

import logging
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import setup  # noqa: E402

p = setup(snakemake)  # noqa: F821
from lede.data import prompt_pool  # noqa: E402
from lede.distill import Sequence, collect, data_hash, greedy_continuations, save_distill  # noqa: E402
from lede.model import load_model  # noqa: E402

split = snakemake.wildcards.split  # noqa: F821
cfg = p.prompts
if split == "train":
    pool = prompt_pool(p.data_dir, "train", include_extra=True)
    take = {c: cfg["spec_bench_per_category"] for c in p.categories}
    take.update(gsm8k=cfg["gsm8k"], qa_nq=cfg["nq_open"])
    max_new = cfg["max_new_tokens"]
else:
    pool = prompt_pool(p.data_dir, "eval", categories=list(p.categories), include_extra=False)
    take = {c: cfg["per_category"] for c in p.categories}
    max_new = cfg["max_new_tokens"]
prompts, seen = [], {}
for pr in pool:  # the pool is in the split's deterministic order; keep the first N per category
    if seen.get(pr.category, 0) < take.get(pr.category, 0):
        prompts.append(pr)
        seen[pr.category] = seen.get(pr.category, 0) + 1
logging.info("%s prompts per category: %s", split, seen)
if not prompts:
    raise SystemExit(f"no {split} prompts selected: check exits.{split} in the config")

lm = load_model(p.model, dtype=p.dtype, device=p.device)
ids = [lm.encode_chat(pr.text) for pr in prompts]
conts = greedy_continuations(lm, ids, max_new, batch_size=p.batch_size)
seqs = [Sequence(i, c, pr.category, pr.uid) for i, c, pr in zip(ids, conts, prompts)]
data = collect(lm, seqs, p.layers)
logging.info("%d positions from %d sequences", len(data), len(seqs))
save_distill(snakemake.output[0], seqs, data, {  # noqa: F821
    "split": split, "model": p.model, "dtype": p.dtype, "layers": p.layers, "max_new_tokens": max_new,
    "data_hash": data_hash(seqs), "prompts": [pr.uid for pr in prompts]})
