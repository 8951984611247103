"""Shared prelude of the workflow scripts: log to the rule's log file, fix the thread count, make the
library importable (also in a conda env where it is not pip-installed)."""

import logging
import sys
from pathlib import Path


def setup(snakemake):
    log = open(snakemake.log[0], "w", buffering=1)
    sys.stdout = sys.stderr = log  # tqdm progress and warnings go to the rule's log
    logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
    import torch

    torch.set_num_threads(int(snakemake.params.threads))
    logging.info("rule %s: threads=%d params=%s", snakemake.rule, torch.get_num_threads(), dict(snakemake.params))
    return snakemake.params


def decoder_from_selection(params, selected_path, max_draft_len):
    """The model and a Decoder with the selected exit heads (adapters + draft vocabulary)."""
    import json

    from lede.engine import Decoder
    from lede.exits import heads_from_selection
    from lede.model import load_model

    lm = load_model(params.model, dtype=params.dtype, device=params.device)
    heads = heads_from_selection(lm, json.loads(open(selected_path).read()))
    return lm, Decoder(lm, exit_heads=heads, max_draft_len=max_draft_len)


def prompts_for(params, split, per_category, extra_gsm8k=0):
    """(uid, category, ids)-ready prompts: Spec-Bench of the split, per category, plus GSM8K train."""
    from lede.data import prompt_pool

    cats = list(params.categories)
    if split == "train":
        cats = [c for c in cats if c != "math_reasoning"]  # all its questions are GSM8K test questions
    prompts = prompt_pool(params.data_dir, split, categories=cats, per_category=per_category, include_extra=False)
    if extra_gsm8k:
        prompts += prompt_pool(params.data_dir, "train", categories=["gsm8k"], per_category=extra_gsm8k)
    return prompts
