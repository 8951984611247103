"""LM head compiled (LinearGraph, rows<=3 / <=4) vs the model's own kernel, one process, interleaved; 2 threads."""
import json, statistics, time
import torch
torch.set_num_threads(2)
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.core.policy import Autoregressive
from lede.data import DEFAULT_DATA_DIR, prompt_pool
lm = load_model("smollm2-135m", kernels="auto", compiled=True, compile_cuts=[4, 6, 8])
cl = lm.fast_layers; graph = cl.head
print("kernels", lm.kernels, "compile s", round(cl.compile_s, 1), "graphs", cl.graphs, flush=True)
dec = Decoder(lm)
ids = torch.randint(0, 49152, (400,), generator=torch.Generator().manual_seed(0)).tolist()
variants = {"own": (None, 0), "graph3": (graph, 3), "graph4": (graph, 4)}
def use(name):
    cl.head, graph.rows = variants[name][0], max(variants[name][1], 1)
pool = prompt_pool(DEFAULT_DATA_DIR, "eval", per_category=1, include_extra=False)[:3]
prompts = [lm.encode_chat(p.text) for p in pool]
res = {}
with torch.inference_mode():
    outs = {}
    for name in variants:
        use(name); outs[name] = [dec.generate(p, Autoregressive(), max_new_tokens=64).token_ids for p in prompts]
    print("identical outputs", {n: outs[n] == outs["own"] for n in variants}, flush=True)
    cache = dec.new_cache(300); use("own"); dec.prefill(ids[:256], cache)
    for rep in range(25):
        for t in (1, 2, 3, 4, 5):
            for name in variants:
                use(name); dec.verify(ids[256:256 + t], None, cache); cache.crop(256); xs = []
                for _ in range(3):
                    s = time.perf_counter(); dec.verify(ids[256:256 + t], None, cache); xs.append(time.perf_counter() - s); cache.crop(256)
                res.setdefault(f"verify{t}/{name}", []).append(statistics.median(xs) * 1e3)
        for name in variants:
            use(name); xs = []
            for _ in range(4):
                s = time.perf_counter()
                for j in range(3): dec.draft_step(ids[256 + j], 4, cache)
                xs.append((time.perf_counter() - s) / 3); cache.crop(256, range(4))
            res.setdefault(f"draft_L4/{name}", []).append(statistics.median(xs) * 1e3)
        if rep % 4 == 0:
            for p in prompts:
                for name in variants:
                    use(name); s = time.perf_counter(); out = dec.generate(p, Autoregressive(), max_new_tokens=64)
                    res.setdefault(f"decode/{name}", []).append(len(out.token_ids) / (time.perf_counter() - s))
            cache = dec.new_cache(300); use("own"); dec.prefill(ids[:256], cache)
        print("rep", rep, time.strftime("%X"), flush=True)
print("recompilations", cl.recompilations)
for key in sorted({k.split("/")[0] for k in res}):
    base = res[f"{key}/own"]
    line = f"{key:10s} own {statistics.median(base):7.2f}"
    for name in ("graph3", "graph4"):
        xs = res[f"{key}/{name}"]
        r = [b / a for a, b in zip(base, xs)]
        won = sum((x < a) if key != "decode" else (x > a) for a, x in zip(base, xs))
        line += f" | {name} {statistics.median(xs):7.2f} ratio {statistics.median(r):.3f} won {won}/{len(xs)}"
    print(line)
json.dump(res, open("/tmp/s8/head_ab.json", "w"))
