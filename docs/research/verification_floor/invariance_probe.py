"""Batch invariance of oneDNN-prepacked linears: is row r of an M-row product bit-identical to the same row in
a 1-row (or 2-row) product? Per weight shape of SmolLM2-135M, M = 1..17, 1 and 2 threads."""
import torch
pt = lambda x, pw: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
for threads in (2, 1):
    torch.set_num_threads(threads)
    for (n, k) in [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]:
        w = torch.randn(n, k) * 0.02
        pw = torch.ops.mkldnn._reorder_linear_weight(w, None)
        x = torch.randn(17, k)
        one = torch.cat([pt(x[i:i+1], pw) for i in range(17)])
        two = torch.cat([pt(torch.cat([x[i:i+1], x[i:i+1]]), pw)[:1] for i in range(17)])
        bad1 = [m for m in range(2, 18) if not torch.equal(pt(x[:m], pw), one[:m])]
        bad2 = [m for m in range(2, 18) if not torch.equal(pt(x[:m], pw), two[:m])]
        print(f"threads={threads} W{(n, k)}: M differing from 1-row: {bad1 or 'none'}; from 2-row(duplicated): {bad2 or 'none'}")
