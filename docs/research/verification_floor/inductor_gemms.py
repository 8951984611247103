"""Issue 40 research probe (2026-12-07; run: python inductor_gemms.py lede|onednn|freeze|autotune, env MS=1,2 DYN=1
SEED BACKENDS): all 121 linears of SmolLM2-135M (fused qkv, o, fused gate_up, down x30 + lm_head), distinct weights (no cache
reuse), M = 1,2,3,5,9: lede (W @ X^T), onednn packed, inductor frozen (default / max-autotune). Times in ms."""
import os, sys, time, statistics as st
import torch, torch.nn.functional as F
from torch import nn
torch.set_num_threads(2)
torch.manual_seed(int(os.environ.get("SEED", "0")))
D, I, V, KVD = 576, 1536, 49152, 192
shapes = []
for _ in range(30):
    shapes += [(D + 2 * KVD, D), (D, D), (2 * I, D), (D, I)]
shapes.append((V, D))

class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(o, i) * 0.02, requires_grad=False) for o, i in shapes])
    def forward(self, xs):  # xs: dict in_features -> [M, in]; apply each linear to the input of its width
        out = None
        for w in self.ws:
            y = F.linear(xs[w.shape[1]], w)
            out = y.sum() if out is None else out + y[0, 0]
        return out

m = Lin().eval()
mode = sys.argv[1]
Ms = [int(x) for x in os.environ.get("MS", "1,2,3,5,9").split(",")]
def inputs(M):
    return {D: torch.randn(M, D), I: torch.randn(M, I)}
if mode == "lede":
    def run(xs):
        for w in m.ws:
            x = xs[w.shape[1]]
            if x.shape[0] == 1: x = torch.cat([x, x])
            y = (w @ x.T)
        return y
elif mode == "onednn":
    packed = [torch.ops.mkldnn._reorder_linear_weight(w.detach(), None) for w in m.ws]
    def run(xs):
        for w, p in zip(m.ws, packed):
            x = xs[w.shape[1]]
            y = torch.ops.mkldnn._linear_pointwise(x.expand(2, -1) if x.shape[0] == 1 else x, p, None, "none", [], "")
        return y
else:
    import torch._inductor.config as ic
    ic.freezing = True
    if mode == "autotune":
        ic.max_autotune = True
        ic.max_autotune_gemm_backends = os.environ.get("BACKENDS", "CPP,ATEN")
    ic.cpp.threads = 2
    dyn = os.environ.get("DYN") == "1"
    comp = torch.compile(m, dynamic=dyn)
    def run(xs):
        return comp(xs)
res = {}
with torch.no_grad():
    for M in Ms:
        xs = inputs(M)
        t0 = time.perf_counter(); run(xs); c = time.perf_counter() - t0
        for _ in range(3): run(xs)
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); run(xs); ts.append((time.perf_counter() - t0) * 1e3)
        res[M] = st.median(ts)
        print(f"{mode} M={M}: {res[M]:.1f} ms (first call {c:.1f} s) iqr {st.quantiles(ts, n=4)[2]-st.quantiles(ts, n=4)[0]:.1f}", flush=True)
