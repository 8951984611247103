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
