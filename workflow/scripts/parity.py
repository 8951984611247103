"""Rule parity: compare every method's saved run with plain decoding's (lede.eval.parity.write_parity)."""

import logging
from pathlib import Path

from lede.study import load_lm, setup

p = setup(snakemake)  # noqa: F821
from lede.eval.parity import MethodRun, write_parity  # noqa: E402

out_dir = Path(snakemake.output.md).parent  # noqa: F821
runs = [MethodRun.load(out_dir, m) for m in p.methods]
report = write_parity(out_dir, runs, load_lm(p), baseline="plain", seed=p.seed)
logging.info("\n%s", report.to_markdown())
