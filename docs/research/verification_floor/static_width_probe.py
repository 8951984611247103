"""Dynamic several-token graphs (traced at 2) vs static-width graphs (T padded up to a bucket), one process,
interleaved. Pass times (dec.verify incl. LM head) at ctx 256/2048, T=1,2,3,4,5,7,9."""
import json, statistics, sys, time
import torch, torch._dynamo
torch.set_num_threads(2)
torch._dynamo.config.recompile_limit = 200
torch._dynamo.config.cache_size_limit = 200
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.core.compiled import CompiledLayers, INDUCTOR_OPTIONS
from torch._inductor import config as inductor_config
from lede.eval.cost_probe import read_bandwidth, weight_bytes
CUTS = [4, 6, 8]
BUCKETS = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [2, 3, 5, 9]
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 12

class Static(CompiledLayers):
    def run_range(self, start, end, h, cache, mask, cos, sin):
        n, t = cache.lengths[start], h.shape[1]
        if t == 1 or n < 2 or not self.covers(start, end):
            return super().run_range(start, end, h, cache, mask, cos, sin)
        b = min(x for x in BUCKETS if x >= t)
        D, hd = h.shape[-1], cos.shape[-1]
        h = torch.cat((h, h.new_zeros(1, b - t, D)), 1)
        cos = torch.cat((cos[0], cos.new_ones(b - t, hd))); sin = torch.cat((sin[0], sin.new_zeros(b - t, hd)))
        for x in (h,): torch._dynamo.mark_static(x, 1)
        for x in (cos, sin): torch._dynamo.mark_static(x, 0)
        k_all, v_all = cache.k[:, 0], cache.v[:, 0]
        with inductor_config.patch(INDUCTOR_OPTIONS):
            for a, bb, graph in self.segments:
                if start <= a and bb <= end:
                    h, k_new, v_new = graph(h, k_all, v_all, n, cos, sin)
                    k_all[a:bb, :, n:n + t] = k_new[:, :, :t]
                    v_all[a:bb, :, n:n + t] = v_new[:, :, :t]
        for i in range(start, end):
            cache.lengths[i] = n + t
        return h[:, :t]

lm = load_model("smollm2-135m", kernels="auto", compiled=False)
eager = lm.fast_layers
dyn = CompiledLayers(eager, CUTS)
print("dyn compile s", round(dyn.warm(lm.hidden_size, lm.dtype, lm.device), 1), flush=True)
st = Static(eager, CUTS)
dec = Decoder(lm)
ids = torch.randint(0, 49152, (2100,), generator=torch.Generator().manual_seed(0)).tolist()
caches = {}
with torch.inference_mode():
    for ctx in (256, 2048):
        c = dec.new_cache(ctx + 12); lm.fast_layers = eager; dec.prefill(ids[:ctx], c); caches[ctx] = c
    lm.fast_layers = st
    for b in BUCKETS:
        s = time.perf_counter(); dec.verify(ids[256:256 + b], None, caches[256]); caches[256].crop(256)
        print("static", b, "compile s", round(time.perf_counter() - s, 1), flush=True)
variants = {"dyn": dyn, "static": st}
TS = (1, 2, 3, 4, 5, 7, 9)
res = {}
# exactness: static vs dyn logits argmax per row
with torch.inference_mode():
    flips = 0; rows = 0
    for ctx in (256, 2048):
        for t in TS[1:]:
            outs = {}
            for name, layers in variants.items():
                lm.fast_layers = layers
                outs[name] = dec.verify(ids[ctx:ctx + t], None, caches[ctx]); caches[ctx].crop(ctx)
            print("verify out type", type(outs["dyn"]).__name__) if (ctx, t) == (256, 2) else None
bw = read_bandwidth(2048, 9, lm.device)
with torch.inference_mode():
    for rep in range(REPS):
        print('rep', rep, time.strftime('%X'), flush=True)
        for ctx in (256, 2048):
            for t in TS:
                c = caches[ctx]; toks = ids[ctx:ctx + t]
                for name, layers in variants.items():
                    lm.fast_layers = layers
                    dec.verify(toks, None, c); c.crop(ctx)
                    xs = []
                    for _ in range(3):
                        s = time.perf_counter(); dec.verify(toks, None, c); xs.append(time.perf_counter() - s); c.crop(ctx)
                    res.setdefault(f"{ctx}/{t}/{name}", []).append(statistics.median(xs) * 1e3)
bw += read_bandwidth(2048, 9, lm.device)
floor = weight_bytes(lm) / (statistics.median(bw) * 1e9) * 1e3
print(f"bandwidth {statistics.median(bw):.1f} GB/s floor {floor:.2f} ms")
med = {k: statistics.median(v) for k, v in res.items()}
spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) / statistics.median(v) for k, v in res.items()}
for ctx in (256, 2048):
    for name in variants:
        one = med[f"{ctx}/1/{name}"]
        print(f"ctx {ctx} {name:7s} " + " ".join(f"T{t} {med[f'{ctx}/{t}/{name}']:.1f}({med[f'{ctx}/{t}/{name}']/one:.2f})" for t in TS) + f"  T1/floor {one/floor:.2f} maxIQR {max(spread[f'{ctx}/{t}/{name}'] for t in TS):.2f}")
    print("paired static/dyn", " ".join(f"T{t} {statistics.median([s/d for s, d in zip(res[f'{ctx}/{t}/static'], res[f'{ctx}/{t}/dyn'])]):.3f}" for t in TS))
json.dump({"bandwidth": bw, "floor_ms": floor, "buckets": BUCKETS, "times": res}, open(f"/tmp/s8/static_{'_'.join(map(str, BUCKETS))}.json", "w"))
