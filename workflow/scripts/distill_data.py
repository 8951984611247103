"""Rule distill_data: greedy continuations of the split's prompts (train: and sampled ones), teacher-forced hidden
states."""

import logging

from lede.study import distillation_sequences, setup

p = setup(snakemake)  # noqa: F821
from lede.drafters.distill import collect, data_hash, save_distill  # noqa: E402

split = snakemake.wildcards.split  # noqa: F821
lm, seqs, max_new = distillation_sequences(p, split, **p.sampling)
data = collect(lm, seqs, p.layers)
logging.info("%d positions from %d sequences", len(data), len(seqs))
save_distill(snakemake.output[0], seqs, data, {  # noqa: F821
    "split": split, "model": p.model, "dtype": p.dtype, "layers": p.layers, "max_new_tokens": max_new,
    "samples": p.sampling["samples"], "data_hash": data_hash(seqs), "prompts": [s.uid for s in seqs]})
