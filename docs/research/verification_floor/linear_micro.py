"""Micro-benchmark: the linears of one SmolLM2-135M pass (30 layers x qkv/o/gate_up/down + LM head, distinct
random fp32 weights so the pass streams ~538 MB like the real one), T = 1..9 rows, several kernels, interleaved.
Prints median ms per 'pass' (linears only) and IQR."""
import json, statistics, time, sys
import torch
import torch.nn.functional as F
torch.set_num_threads(2)
torch.manual_seed(0)
D, I, V, L = 576, 1536, 49152, 30
shapes = []
for _ in range(L):
    shapes += [(D + 2 * 192, D), (D, D), (2 * I, D), (D, I)]
shapes.append((V, D))
W = [torch.randn(n, k) * 0.02 for n, k in shapes]
nbytes = sum(w.numel() * 4 for w in W)
mkldnn_W = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in W]  # onednn prepack (no batch size)
Ts = [int(a) for a in sys.argv[1:]] or [1, 2, 3, 5, 9]
mkl_W = {t: [torch.ops.mkl._mkl_reorder_linear_weight(w, t) for w in W] for t in Ts}

def run(kind, t):
    x576 = torch.randn(t, D); x1536 = torch.randn(t, I)
    def go():
        for i, w in enumerate(W):
            x = x1536 if w.shape[1] == I else x576
            if kind == "F.linear": F.linear(x, w)
            elif kind == "x@W.T": x @ w.T
            elif kind == "W@x.T(lede)": (w @ (torch.cat([x, x]) if t == 1 else x).T).T.contiguous()
            elif kind == "onednn_packed": torch.ops.mkldnn._linear_pointwise(x, mkldnn_W[i], None, "none", [], "")
            elif kind == "mkl_packed": torch.ops.mkl._mkl_linear(x, mkl_W[t][i], w, None, t)
    return go

kinds = ["F.linear", "W@x.T(lede)", "onednn_packed", "mkl_packed"]
times = {(k, t): [] for k in kinds for t in Ts}
with torch.inference_mode():
    for rep in range(7):
        for t in Ts:
            for k in kinds:
                f = run(k, t); f()
                t0 = time.perf_counter(); f(); times[(k, t)].append(time.perf_counter() - t0)
print(f"weights {nbytes/1e6:.0f} MB")
for k in kinds:
    row = []
    for t in Ts:
        v = sorted(times[(k, t)]); q = statistics.quantiles(v, n=4)
        row.append(f"T={t}: {statistics.median(v)*1e3:6.1f} [{q[0]*1e3:.0f}-{q[2]*1e3:.0f}]")
    print(f"{k:14s}", "  ".join(row))
