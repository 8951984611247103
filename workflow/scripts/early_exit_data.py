"""Rule early_exit_data: the base model's greedy continuations of a split's prompts (teacher data)."""


from lede.study import distillation_sequences, setup

p = setup(snakemake)  # noqa: F821
from lede.drafters.distill import data_hash, save_teacher  # noqa: E402

split = snakemake.wildcards.split  # noqa: F821
lm, seqs, max_new = distillation_sequences(p, split)
save_teacher(snakemake.output[0], seqs, {  # noqa: F821
    "split": split, "model": p.model, "dtype": p.dtype, "max_new_tokens": max_new,
    "data_hash": data_hash(seqs), "prompts": [s.uid for s in seqs]})
