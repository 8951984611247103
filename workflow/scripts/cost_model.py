"""Rule cost_model: time draft steps (per exit layer, with adapter and draft vocabulary) and
verification passes (per K) on this machine; then the memory floor of a pass and passes of 1..9 tokens per CPU
kernel (``lede.eval.cost_probe.probe_floor``, what `lede costs` runs); a warning in the log where the two price a
several-token pass differently (``price_check``: the host was busy during one of them)."""

import json
import logging

from lede.study import adapter_files, exit_layers, load_lm, setup

p = setup(snakemake)  # noqa: F821
from lede.eval.cost_probe import (FLOOR_TOKENS, PRICE_CHECK_TOLERANCE, measure_costs, price_check,  # noqa: E402
                                  probe_floor)
from lede.core.io import atomic_write_text  # noqa: E402
from lede.core.engine import Decoder  # noqa: E402
from lede.core.exits import build_exit_heads, load_adapter  # noqa: E402

lm = load_lm(p)
files = adapter_files(snakemake.input.adapters)  # noqa: F821
adapters = {d: {l: load_adapter(files[l, d], lm.name, l, lm.hidden_size, template=lm.model.model.layers[-1])
                for l in exit_layers(p)} for d in p.designs}
vocab = next(iter(adapters[p.designs[0]].values())).vocab
dec = Decoder(lm, exit_heads=build_exit_heads(lm, adapters[p.designs[0]], vocab), max_draft_len=p.max_draft_len)
costs = measure_costs(dec, p.layers, p.max_draft_len, context_len=p.context_len, repeats=p.repeats,
                      long_contexts=p.long_contexts,
                      designs={d: build_exit_heads(lm, adapters[d], vocab) for d in p.designs[1:]})
for c in costs.each_context():
    logging.info("context %d: plain step %.2f ms; draft %s; by design %s; verify %s; spread %s", c.context_len,
                 c.plain_ms, c.draft_ms, c.draft_design_ms, c.verify_ms, c.spread)
floor = probe_floor(lm, [p.context_len, *p.long_contexts], [t for t in FLOOR_TOKENS if t <= p.max_draft_len + 1],
                    bandwidth_mb=p.bandwidth_mb)
logging.info("memory floor:\n%s", floor.format())
if off := price_check(costs, floor):  # written anyway (what this host measured); the log says to distrust it
    logging.warning("the cost model's verification prices differ from the floor probe's (same job, same passes) by "
                    "more than %.0f%% at %s: the host was busy while one of them ran; rerun this job when it is quiet "
                    "(snakemake -f %s) before trusting the rewards and replays priced by it",
                    100 * PRICE_CHECK_TOLERANCE, off, snakemake.output.costs)  # noqa: F821
atomic_write_text(snakemake.output.floor, json.dumps(floor.to_json(), indent=1))  # noqa: F821
costs.save(snakemake.output.costs)  # noqa: F821
