"""Compile time, recompile counts and exactness-vs-eager of compiled.CompiledLM for one set of inductor options.
python /work/scratch40/compile_probe.py [opts]   (opts: freezing | freezing,autotune | none)"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_num_threads(2)
from fast import load
from compiled import CompiledLM
from torch._dynamo.utils import counters
opts = sys.argv[1] if len(sys.argv) > 1 else "freezing"
lm, fl = load("onednn")
t0 = time.perf_counter()
c = CompiledLM(lm, 8200, opts=opts)
log = []
for t, ctx in [(1, 256), (9, 256), (2, 300), (5, 2048), (17, 4000), (1, 8000), (3, 7000), (1, 257)]:
    t1 = time.perf_counter(); c.verify(torch.arange(t) + 100, ctx); log.append((t, ctx, round(time.perf_counter() - t1, 2)))
    print(log[-1], dict(counters["stats"]), flush=True)
res = {"opts": opts, "first_calls": log, "total_s": time.perf_counter() - t0,
       "counters": {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}}
print(json.dumps(res))
os.makedirs("/work/scratch40/results", exist_ok=True)
json.dump(res, open(f"/work/scratch40/results/compile_{opts.replace(',', '_')}.json", "w"), indent=1)
