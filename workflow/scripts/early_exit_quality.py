"""Rule early_exit_quality: the base model and its early-exit variant on lm-eval tasks (plain decoding)."""

import logging
import os
from pathlib import Path

from lede.study import load_lm, setup

p = setup(snakemake)  # noqa: F821
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite reads the data dir; nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from lede.eval.parity import compare_models  # noqa: E402

out_dir = Path(snakemake.output.md).parent  # noqa: F821
base = load_lm(p)  # these rules' params name the base model (common_params(base=True))
variant = load_lm(p, early_exit_weights=snakemake.input.weights)  # noqa: F821
report = compare_models(out_dir, base, variant, tasks=list(p.tasks), data_dir=p.data_dir, limit=p.limit,
                        gen_kwargs={"max_gen_toks": p.max_gen_toks})
logging.info("\n%s", (out_dir / "parity.md").read_text())
