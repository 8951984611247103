"""Rule parity_method: one method (plain decoding, a baseline or a LEDE policy) on the offline lm-eval suite."""

import json
import logging
import os
from pathlib import Path

from lede.study import baseline_policy, best_static_cell, load_costs, load_lm, policy_context, setup

p = setup(snakemake)  # noqa: F821
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite reads the data dir; nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from lede.eval.parity import SuiteSettings, evaluate_method  # noqa: E402

method, cfg, kmax = snakemake.wildcards.method, p.parity, p.max_draft_len  # noqa: F821
lm = load_lm(p)
selected = None
if method == "plain":
    policy = "autoregressive"
else:
    selected, costs_path, best_path = snakemake.input.heads  # noqa: F821
    best_l, best_k = best_static_cell(best_path, kmax)
    if method in ("best_static", "adaptive_k", "dynamic_exit"):
        policy = baseline_policy(method, p, best_path, load_costs(costs_path, selected, lm), kmax, lm)
    else:  # a LEDE policy: lede_<algo>_s<seed>
        from lede.rl.spec import parse_policy

        policy = parse_policy(f"file:{snakemake.input.policy}", policy_context(p, lm))  # noqa: F821
        assert policy.name == method, (policy.name, method)
    logging.info("%s: best static cell L=%d K=%d", method, best_l, best_k)
gen_kwargs = {"max_gen_toks": cfg["max_gen_toks"]} if cfg.get("max_gen_toks") else None
logging.info("parity run of %s on %s (limit %d, gen_kwargs %s)", method, cfg["tasks"], cfg["limit"], gen_kwargs)
# lede_humaneval's generated code runs in lede.eval.sandbox: a separate process with CPU, memory and fork limits
suite = SuiteSettings(p.data_dir, cfg["limit"], gen_kwargs, confirm_run_unsafe_code=True)
run = evaluate_method(Path(snakemake.output[0]).parent, method, lm, policy, list(cfg["tasks"]), suite,  # noqa: F821
                      exit_heads=selected)
logging.info("%s: %s", method, json.dumps(run.results, default=str)[:4000])
