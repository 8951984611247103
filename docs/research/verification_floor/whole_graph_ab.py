"""The study's seven segments with and without the graph over all layers (CompiledLayers.whole), one process,
interleaved (the same compiled segments; 'whole' toggled), 2 threads: verification, drafts, plain decoding."""
import json, statistics, time
import torch
torch.set_num_threads(2)
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.core.policy import Autoregressive, Static
from lede.data import DEFAULT_DATA_DIR, prompt_pool
lm = load_model("smollm2-135m", kernels="auto", compiled=True, compile_cuts=[2, 4, 6, 8, 12, 18])
cl = lm.fast_layers; whole = cl.whole
print("compile s", round(cl.compile_s, 1), "graphs", cl.graphs, flush=True)
dec = Decoder(lm)
ids = torch.randint(0, 49152, (400,), generator=torch.Generator().manual_seed(0)).tolist()
pool = prompt_pool(DEFAULT_DATA_DIR, "eval", per_category=1, include_extra=False)[:3]
prompts = [lm.encode_chat(p.text) for p in pool]
variants = {"segments": None, "whole": whole}
res = {}
with torch.inference_mode():
    outs = {}
    for name, w in variants.items():
        cl.whole = w
        outs[name] = [dec.generate(p, pol, max_new_tokens=48).token_ids for p in prompts for pol in (Autoregressive(), Static(4, 3))]
    print("identical", outs["whole"] == outs["segments"], flush=True)
    cache = dec.new_cache(300); dec.prefill(ids[:256], cache)
    for rep in range(20):
        for t in (1, 2, 3, 5, 9):
            for name, w in variants.items():
                cl.whole = w; dec.verify(ids[256:256 + t], None, cache); cache.crop(256); xs = []
                for _ in range(3):
                    s = time.perf_counter(); dec.verify(ids[256:256 + t], None, cache); xs.append(time.perf_counter() - s); cache.crop(256)
                res.setdefault(f"verify{t}/{name}", []).append(statistics.median(xs) * 1e3)
        if rep % 4 == 0:
            for p in prompts:
                for name, w in variants.items():
                    cl.whole = w; s = time.perf_counter(); out = dec.generate(p, Autoregressive(), max_new_tokens=64)
                    res.setdefault(f"decode/{name}", []).append(len(out.token_ids) / (time.perf_counter() - s))
            cache = dec.new_cache(300); dec.prefill(ids[:256], cache)
        print("rep", rep, time.strftime("%X"), flush=True)
cl.whole = whole
print("recompilations", cl.recompilations)
for key in sorted({k.split("/")[0] for k in res}):
    a, b = res[f"{key}/segments"], res[f"{key}/whole"]
    r = [y / x for x, y in zip(a, b)]
    won = sum((y < x) if key != "decode" else (y > x) for x, y in zip(a, b))
    print(f"{key:8s} segments {statistics.median(a):7.2f} whole {statistics.median(b):7.2f} whole/segments {statistics.median(r):.3f} won {won}/{len(r)}")
json.dump(res, open("/tmp/s8/whole_ab.json", "w"))
