"""Rule train_policy: one d3rlpy algorithm and seed on the logged experience (engine + replayed)."""

import csv
import logging
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import setup  # noqa: E402

p = setup(snakemake)  # noqa: F821
from lede.io import atomic_path  # noqa: E402
from lede.rl import Experience, train_policy  # noqa: E402

w = snakemake.wildcards  # noqa: F821
parts = [Experience.load(snakemake.input.exp[0].removesuffix(".parquet"))]  # noqa: F821
if snakemake.input.replay:  # noqa: F821
    parts.append(Experience.load(snakemake.input.replay[0].removesuffix(".parquet")))  # noqa: F821
exp = Experience.concat(parts) if len(parts) > 1 else parts[0]
logging.info("training on %s transitions (%d episodes)", " + ".join(str(len(e)) for e in parts), len(exp.behaviour))
res = train_policy(exp, algo=w.algo, seed=int(w.seed), n_steps=p.n_steps, n_steps_per_epoch=max(p.n_steps // 10, 1),
                   log_dir=p.logs, run_name=f"{w.algo}_s{w.seed}", eval_episodes=p.eval_episodes,
                   gamma=p.gamma, hidden_units=p.hidden_units,
                   target_update_interval=p.target_update_interval)
logging.info("history %s; FQE initial-state value %s", res.history, res.fqe_value)
res.policy.save(snakemake.output.policy)  # noqa: F821
with atomic_path(snakemake.output.history) as tmp, open(tmp, "w", newline="") as f:  # noqa: F821
    keys = sorted({k for h in res.history for k in h})
    wr = csv.DictWriter(f, fieldnames=keys)
    wr.writeheader()
    wr.writerows(res.history)
