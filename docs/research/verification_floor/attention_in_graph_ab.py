"""Before/after the in-graph attention (commit 44fffd3's lede::attend segments vs this tree's), one process,
interleaved: pass times at contexts 256/2048 and T = 1/2/3/5/9, and plain decoding tok/s. 2 threads.

    git show 44fffd3:src/lede/core/compiled.py > /tmp/s7/compiled_old.py
    python3 docs/research/verification_floor/attention_in_graph_ab.py 4,6,8     # the study's exit layers as cuts
"""
import importlib.util, json, statistics, sys, time, logging
import torch
torch.set_num_threads(2)
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.core.policy import Autoregressive
from lede.core import compiled as new_mod
from lede.eval.cost_probe import read_bandwidth, weight_bytes
from lede.data import DEFAULT_DATA_DIR, prompt_pool
spec = importlib.util.spec_from_file_location("compiled_old", "/tmp/s7/compiled_old.py")
old_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(old_mod)
CUTS = [int(c) for c in sys.argv[1].split(",")] if len(sys.argv) > 1 and sys.argv[1] else []
lm = load_model("smollm2-135m", kernels="auto", compiled=False)
eager = lm.fast_layers
variants = {}
for name, mod in (("before", old_mod), ("after", new_mod)):
    layers = mod.CompiledLayers(eager, CUTS)
    print(name, "compile s", round(layers.warm(lm.hidden_size, lm.dtype, lm.device), 1), "graphs", layers.graphs, flush=True)
    variants[name] = layers
dec = Decoder(lm)
ids = torch.randint(0, 49152, (2100,), generator=torch.Generator().manual_seed(0)).tolist()
caches = {}
with torch.inference_mode():  # as the engine decodes: inference tensors (dynamo guards on the dispatch keys)
    for ctx in (256, 2048):
        c = dec.new_cache(ctx + 12); lm.fast_layers = eager; dec.prefill(ids[:ctx], c); caches[ctx] = c
pool = prompt_pool(DEFAULT_DATA_DIR, "eval", per_category=1, include_extra=False)[:3]
prompts = [lm.encode_chat(p.text) for p in pool]
bw = read_bandwidth(2048, 9, lm.device)
res = {}
with torch.inference_mode():
    for rep in range(25):
        print('rep', rep, time.strftime('%X'), flush=True)
        for ctx in (256, 2048):
            for t in (1, 2, 3, 5, 9):
                c = caches[ctx]; toks = ids[ctx:ctx + t]
                for name, layers in variants.items():
                    lm.fast_layers = layers
                    dec.verify(toks, None, c); c.crop(ctx)
                    xs = []
                    for _ in range(3):
                        s = time.perf_counter(); dec.verify(toks, None, c); xs.append(time.perf_counter() - s); c.crop(ctx)
                    res.setdefault(f"{ctx}/{t}/{name}", []).append(statistics.median(xs) * 1e3)
        if rep % 3 == 0:
            for p in prompts:
                for name, layers in variants.items():
                    lm.fast_layers = layers
                    s = time.perf_counter(); out = dec.generate(p, Autoregressive(), max_new_tokens=64)
                    res.setdefault(f"decode/{name}", []).append(len(out.token_ids) / (time.perf_counter() - s))
            dec.new_cache(2100)  # generate's caches reset the rotary table to their own length
bw += read_bandwidth(2048, 9, lm.device)
floor = weight_bytes(lm) / (statistics.median(bw) * 1e9) * 1e3
print(f"bandwidth {statistics.median(bw):.1f} GB/s (runs {min(bw):.1f}-{max(bw):.1f}), weights {weight_bytes(lm)/1e6:.0f} MB, floor {floor:.2f} ms")
for name in variants:
    print("recompilations", name, getattr(variants[name], "recompilations", None))
med = {k: statistics.median(v) for k, v in res.items()}
spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) / statistics.median(v) for k, v in res.items()}
for ctx in (256, 2048):
    for name in variants:
        one = med[f"{ctx}/1/{name}"]
        print(f"ctx {ctx} {name:7s} " + " ".join(f"T{t} {med[f'{ctx}/{t}/{name}']:.1f}({med[f'{ctx}/{t}/{name}']/one:.2f})" for t in (1, 2, 3, 5, 9)) + f"  T1/floor {one/floor:.2f}  max IQR/med {max(spread[f'{ctx}/{t}/{name}'] for t in (1,2,3,5,9)):.2f}")
for name in variants:
    print(f"plain decoding {name}: {med[f'decode/{name}']:.1f} tok/s (IQR/med {spread[f'decode/{name}']:.2f})")
json.dump({"bandwidth": bw, "floor_ms": floor, "cuts": CUTS, "times": res}, open("/tmp/s7/ab.json", "w"))
