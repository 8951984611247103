"""Drafting path (issue 40, item 4): one token through layers [0, L) for L in {2, 4, 8, 30}, without and with the
(full-vocabulary) plain head, at context 256; lede's Decoder with transformers' layers ("torch"), with lede's
kernels ("lede"), and fast.FastLM eager oneDNN ("onednn"); interleaved; median ms and IQR.

python /work/scratch40/draft.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from fast import load, rope_tables  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--out", default="/work/scratch40/results/draft.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "snap"))
    from lede.engine import Decoder
    from lede.kernels import reference_kernels

    lm, fl = load("onednn", kernels="lede")
    dec = Decoder(lm)
    ctx = a.ctx
    ids = torch.randint(100, 40000, (ctx + 2,), generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(lm, ctx + 4)
    Ls = (2, 4, 8, 30)
    variants = ("torch", "lede", "onednn")
    times = {(v, L, hd): [] for v in variants for L in Ls for hd in (0, 1)}
    with torch.inference_mode():
        cache = dec.new_cache(ctx + 4)
        dec._layers(dec.embed(ids[None, :ctx]), 0, dec.n_layers, cache)
        k = torch.zeros(30, 1, 3, ctx + 4, 64)
        v_ = torch.zeros_like(k)
        fl.full(ids[:ctx], k, v_, 0, cos, sin)
        tok = ids[ctx : ctx + 1]
        for _ in range(a.repeats):
            for L in Ls:
                for hd in (0, 1):
                    for v in variants:
                        for i in range(2):
                            t0 = time.perf_counter()
                            if v == "onednn":
                                h = fl.run(fl.embed_w[tok], k, v_, ctx, cos, sin, 0, L)
                                if hd:
                                    fl.logits(h)
                            else:
                                def go():
                                    h = dec._layers(dec.embed(tok[None]), 0, L, cache)
                                    if hd:
                                        dec.plain_head(h[0, -1])
                                if v == "torch":
                                    with reference_kernels(lm.model):
                                        go()
                                else:
                                    go()
                                cache.crop(ctx)
                            if i:
                                times[(v, L, hd)].append(time.perf_counter() - t0)
    res = {}
    for (v, L, hd), ts in times.items():
        q = statistics.quantiles(ts, n=4)
        res[f"{v}/L={L}/{'head' if hd else 'layers'}"] = {"median_ms": statistics.median(ts) * 1e3,
                                                          "iqr_ms": [q[0] * 1e3, q[2] * 1e3]}
    res["weight_mb"] = {f"L={L}": fl.weight_bytes(0, L, head=False) / 1e6 for L in Ls}
    res["head_mb"] = fl.head.w.numel() * 4 / 1e6
    res["loadavg"] = os.getloadavg()
    json.dump(res, open(a.out, "w"), indent=1)
    for v in variants:
        print(v, "  ".join(f"L={L} {res[f'{v}/L={L}/layers']['median_ms']:.1f} (+head {res[f'{v}/L={L}/head']['median_ms']:.1f})"
                           for L in Ls))
    print("weights MB", res["weight_mb"], "head MB", res["head_mb"], "load", res["loadavg"])


if __name__ == "__main__":
    main()
