"""Rule parity_method: one method (plain decoding, a baseline or a LEDE policy) on the offline lm-eval suite."""

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
from lede.parity import evaluate_method  # noqa: E402

method, cfg, kmax = snakemake.wildcards.method, p.parity, p.max_draft_len  # noqa: F821
lm = load_lm(p)
selected = None
if method == "plain":
    policy = "autoregressive"
else:
    selected, costs_path, best_path = snakemake.input.heads  # noqa: F821
    cells = [c for c in json.loads(Path(best_path).read_text())["cells"] if c["draft_len"] <= kmax]
    best_l, best_k = cells[0]["exit_layer"], cells[0]["draft_len"]
    if method == "best_static":
        from lede.policy import Static

        policy = Static(best_l, best_k)
    elif method == "adaptive_k":
        from lede.heuristics import AdaptiveDraftLength

        policy = AdaptiveDraftLength(best_l, initial=best_k, max_len=kmax)
    elif method == "dynamic_exit":
        from lede.costs import CostModel
        from lede.heuristics import DynamicExit

        policy = DynamicExit(p.layers, CostModel.load(costs_path), kmax)
    else:  # a LEDE policy: lede_<algo>_s<seed>
        from lede.rl import RLPolicy

        policy = RLPolicy.load(snakemake.input.policy, lm_name=lm.name, exit_layers=p.layers)  # noqa: F821
        assert policy.name == method, (policy.name, method)
    logging.info("%s: best static cell L=%d K=%d", method, best_l, best_k)
gen_kwargs = {"max_gen_toks": cfg["max_gen_toks"]} if cfg.get("max_gen_toks") else None
logging.info("parity run of %s on %s (limit %d, gen_kwargs %s)", method, cfg["tasks"], cfg["limit"], gen_kwargs)
# lede_humaneval's generated code runs in lede.sandbox: a separate process with CPU, memory and fork limits
run = evaluate_method(Path(snakemake.output[0]).parent, method, lm, policy, list(cfg["tasks"]),  # noqa: F821
                      data_dir=p.data_dir, limit=cfg["limit"], gen_kwargs=gen_kwargs, exit_heads=selected,
                      confirm_run_unsafe_code=True)
logging.info("%s: %s", method, json.dumps(run.results, default=str)[:4000])
