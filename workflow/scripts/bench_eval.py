"""Rule bench_eval: plain decoding, transformers' generate and the best static cells, interleaved, on
held-out Spec-Bench prompts."""

import json
import logging
import sys
from dataclasses import asdict

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import setup  # noqa: E402

p = setup(snakemake)  # noqa: F821
import torch  # noqa: E402

from lede.bench import HF_GENERATE, BenchPrompt, format_summary, run_bench, summarize, write_json  # noqa: E402
from lede.data import prompt_pool  # noqa: E402
from lede.engine import Decoder  # noqa: E402
from lede.exits import heads_from_selection  # noqa: E402
from lede.model import load_model  # noqa: E402
from lede.policy import Static  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
selection = json.loads(open(inp.selected).read())
cells = json.loads(open(inp.best).read())["cells"]
lm = load_model(p.model, dtype=p.dtype, device=p.device)
heads = heads_from_selection(lm, selection)
dec = Decoder(lm, exit_heads=heads, max_draft_len=max(c["draft_len"] for c in cells))
prompts = prompt_pool(p.data_dir, "eval", categories=list(p.categories), per_category=p.per_category,
                      include_extra=False)
bench_prompts = [BenchPrompt(pr.uid, pr.category, tuple(lm.encode_chat(pr.text))) for pr in prompts]
configs = {HF_GENERATE: HF_GENERATE}
for c in cells:
    policy = Static(c["exit_layer"], c["draft_len"])
    configs[policy.name] = policy
records = run_bench(dec, bench_prompts, configs, max_new_tokens=p.max_new_tokens)
overall, per_cat = summarize(records), summarize(records, group=lambda r: r.category)
header = (f"model={p.model} dtype={lm.dtype} device={lm.device} threads={torch.get_num_threads()} "
          f"prompts={len(prompts)} max_new_tokens={p.max_new_tokens} (evaluation half, interleaved)")
logging.info("%s\n%s\n%s", header, format_summary(overall), format_summary(per_cat))
write_json(out.json, {"settings": dict(p) | {"torch_threads": torch.get_num_threads()}, "cells": cells,
                      "summary": {g: [asdict(s) for s in rows] for g, rows in (overall | per_cat).items()},
                      "records": [asdict(r) for r in records]})
md = ["# Speed on held-out prompts", "", header, "", "```", format_summary(overall), "", format_summary(per_cat), "```", ""]
tmp = out.md + ".tmp"
open(tmp, "w").write("\n".join(md))
import os  # noqa: E402

os.replace(tmp, out.md)
