"""Rule bench_eval: plain decoding, transformers' generate and the best static cells, interleaved, on
held-out Spec-Bench prompts."""

import json

from lede.study import bench_journal, eval_bench_prompts, load_lm, setup, write_bench

p = setup(snakemake)  # noqa: F821
from lede.eval.bench import HF_GENERATE, run_bench  # noqa: E402
from lede.core.engine import Decoder  # noqa: E402
from lede.core.exits import load_exit_heads  # noqa: E402
from lede.core.policy import Static  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
cells = json.loads(open(inp.best).read())["cells"]
lm = load_lm(p, costs_path=snakemake.input.costs)  # noqa: F821  (the kernels the cost model was timed on)
heads = load_exit_heads(lm, inp.selected)
dec = Decoder(lm, exit_heads=heads, max_draft_len=max(c["draft_len"] for c in cells))
prompts = eval_bench_prompts(p, lm)
configs = {HF_GENERATE: HF_GENERATE}
for c in cells:
    policy = Static(c["exit_layer"], c["draft_len"])
    configs[policy.name] = policy
journal = bench_journal(snakemake, snakemake.output.json)  # noqa: F821  (an interrupted run resumes)
journal.begin(**journal.kernels(lm))  # a resumed run re-applies the kernels `auto` chose first
records = run_bench(dec, prompts, configs, max_new_tokens=p.max_new_tokens, journal=journal)
write_bench(p, lm, records, len(prompts), out, "Speed on held-out prompts", {"cells": cells})
journal.finish()
