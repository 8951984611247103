"""Rule parity: plain decoding, then each configured method, on the offline lm-eval suite (lede.parity)."""

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import load_lm, setup  # noqa: E402

p = setup(snakemake)  # noqa: F821
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite reads the data dir; nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from lede.costs import CostModel  # noqa: E402
from lede.heuristics import AdaptiveDraftLength, DynamicExit  # noqa: E402
from lede.parity import run_parity  # noqa: E402
from lede.policy import Static  # noqa: E402
from lede.rl import RLPolicy  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
cfg, kmax = p.parity, p.max_draft_len
selected, costs_path, best_path = inp.heads
lm = load_lm(p)
cells = [c for c in json.loads(Path(best_path).read_text())["cells"] if c["draft_len"] <= kmax]
best_l, best_k = cells[0]["exit_layer"], cells[0]["draft_len"]
factories = {
    "best_static": lambda: {"best_static": Static(best_l, best_k)},
    "adaptive_k": lambda: {"adaptive_k": AdaptiveDraftLength(best_l, initial=best_k, max_len=kmax)},
    "dynamic_exit": lambda: {"dynamic_exit": DynamicExit(p.layers, CostModel.load(costs_path), kmax)},
    "lede": lambda: {(pol := RLPolicy.load(path, lm_name=lm.name, exit_layers=p.layers)).name: pol
                     for path in inp.policies},
}
methods = {name: policy for m in cfg["methods"] for name, policy in factories[m]().items()}
logging.info("parity of %s against plain decoding on %s (limit %d, best static L=%d K=%d)",
             list(methods), cfg["tasks"], cfg["limit"], best_l, best_k)
gen_kwargs = {"max_gen_toks": cfg["max_gen_toks"]} if cfg.get("max_gen_toks") else None
# lede_humaneval's generated code runs in lede.sandbox: a separate process with CPU, memory and fork limits
report = run_parity(Path(out.md).parent, methods=methods, tasks=list(cfg["tasks"]), data_dir=p.data_dir,
                    limit=cfg["limit"], gen_kwargs=gen_kwargs, loaded=lm, exit_heads=selected,
                    confirm_run_unsafe_code=True, seed=p.seed)
logging.info("\n%s", report.to_markdown())
