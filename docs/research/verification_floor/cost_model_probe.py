"""The study's cost model (measure_costs) on this tree's engine: SmolLM2 compiled at the study's cuts (with the
whole-stack graph and the compiled head), plain exit heads (no adapters: the draft cost of an exit is its layers
plus the full-vocabulary head), lookup and exits 2/4/6/8/12/18, K up to 8, context 256 (+2048), 2 threads."""
import json, time
import torch
torch.set_num_threads(2)
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.eval.cost_probe import measure_costs
t0 = time.time()
lm = load_model("smollm2-135m", kernels="auto", compiled=True, compile_cuts=[2, 4, 6, 8, 12, 18])
print("load", round(time.time() - t0), "compile", round(lm.fast_layers.compile_s), "graphs", lm.fast_layers.graphs, flush=True)
dec = Decoder(lm, max_draft_len=8)
c = measure_costs(dec, [0, 2, 4, 6, 8, 12, 18], 8, context_len=256, repeats=20, long_contexts=[2048])
for x in c.each_context():
    print("context", x.context_len, "plain", round(x.plain_ms, 2), "draft", {k: round(v, 2) for k, v in x.draft_ms.items()})
    print("   verify/plain", {k: round(v / x.plain_ms, 3) for k, v in x.verify_ms.items()})
print("recompilations", lm.fast_layers.recompilations, "measure s", round(time.time() - t0))
c.save("/tmp/s8/costs_model.json")
