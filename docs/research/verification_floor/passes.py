"""Floor probe + interleaved pass timings (issue 40, item 1).

python /work/scratch40/passes.py [--variants torch,lede,onednn,mkl,compiled] [--repeats 11] [--out FILE]

A "pass" = embedding of T tokens, all 30 decoder layers over a KV cache holding `ctx` tokens, final norm and the
full LM head -> logits [T, V] (what lede's Decoder._verify does). Variants:
  torch   lede's Decoder._verify with transformers' own layers (kernels="torch": F.linear, "sdpa")
  lede    lede's Decoder._verify with lede's kernels (CpuLinear two-row GEMM + lede_sdpa)
  onednn  fast.FastLM eager: functional layers, fused qkv / gate-up, oneDNN-prepacked linears
  mkl     fast.FastLM eager with MKL cblas-packed linears
  compiled  compiled.CompiledLM (torch.compile of the whole layer range; see compiled.py)
Interleaved: every repeat runs, for every (ctx, T), every variant: one warm-up pass then `timed` passes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from fast import load, rope_tables  # noqa: E402


def read_bandwidth(mb: int = 2048, repeats: int = 9) -> dict:
    """STREAM-style read: torch.sum over a float32 buffer of `mb` MiB (>> L2; this host's L3 is 480 MiB shared,
    so 2 GiB is DRAM), with the configured threads; GB/s of the median and of the quartiles."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    q = statistics.quantiles(ts, n=4)
    b = x.numel() * 4
    return {"mb": mb, "gb_s": b / statistics.median(ts) / 1e9, "gb_s_iqr": [b / q[2] / 1e9, b / q[0] / 1e9],
            "gb_s_best": b / min(ts) / 1e9}


def summarize(v: list[float]) -> dict:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v) * 1e3, "iqr": [q[0] * 1e3, q[2] * 1e3], "min": min(v) * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="torch,lede,onednn,mkl")
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--tokens", default="1,2,3,5,9")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--timed", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/work/scratch40/results/passes.json")
    ap.add_argument("--compile-opts", default="freezing")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    variants = a.variants.split(",")
    contexts = [int(c) for c in a.contexts.split(",")]
    widths = [int(t) for t in a.tokens.split(",")]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "snap"))
    from lede.engine import Decoder
    from lede.kernels import reference_kernels

    lm, fl = load("onednn", kernels="lede")  # CpuLinear-wrapped model; reference_kernels() gives torch's path
    fls = {"onednn": fl}
    if "mkl" in variants:
        from fast import FastLM
        fls["mkl"] = FastLM(lm.model, "mkl")
    dec = Decoder(lm)
    max_len = max(contexts) + max(widths) + 1
    cos, sin = rope_tables(lm, max_len)
    compiled = None
    compile_s = None
    if "compiled" in variants:
        from compiled import CompiledLM
        compiled = CompiledLM(lm, max_len, opts=a.compile_opts)
        t0 = time.perf_counter()
        compiled.warmup(widths, contexts)
        compile_s = time.perf_counter() - t0
    ids = torch.randint(100, 40000, (max(contexts) + max(widths),), generator=torch.Generator().manual_seed(0))
    times = {v: {c: {t: [] for t in widths} for c in contexts} for v in variants}
    with torch.inference_mode():
        bw = [read_bandwidth(2048), read_bandwidth(512)]
        for ctx in contexts:
            cache = dec.new_cache(max_len)
            dec._layers(dec.embed(ids[None, :ctx]), 0, dec.n_layers, cache)
            for name in fls:
                fk = torch.zeros(30, 1, 3, max_len, 64); fv = torch.zeros_like(fk)
                fls[name].full(ids[:ctx], fk, fv, 0, cos, sin)
                fls[name]._cache = (fk, fv)
            if compiled is not None:
                compiled.prefill(ids[:ctx])
            for rep in range(a.repeats):
                for t in widths:
                    toks = ids[ctx : ctx + t]
                    for v in variants:
                        for i in range(a.timed + 1):
                            t0 = time.perf_counter()
                            if v == "torch":
                                with reference_kernels(lm.model):
                                    dec._verify(toks.tolist(), None, cache)
                            elif v == "lede":
                                dec._verify(toks.tolist(), None, cache)
                            elif v == "compiled":
                                compiled.verify(toks, ctx)
                            else:
                                fk, fv = fls[v]._cache
                                fls[v].full(toks, fk, fv, ctx, cos, sin)
                            dt = time.perf_counter() - t0
                            if i:
                                times[v][ctx][t].append(dt)
                            cache.crop(ctx)
                report(a, variants, [c for c in contexts if times[variants[0]][c][widths[-1]]], widths, times, bw, fl, compile_s, compiled)
        bw.append(read_bandwidth(2048))
        report(a, variants, contexts, widths, times, bw, fl, compile_s, compiled, final=True)


def report(a, variants, contexts, widths, times, bw, fl, compile_s, compiled, final=False):
    gbs = statistics.median([b["gb_s"] for b in bw if b["mb"] == 2048])
    wbytes = fl.weight_bytes()
    floor_ms = wbytes / (gbs * 1e9) * 1e3
    out = {"host": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                    "torch": torch.__version__, "loadavg_end": os.getloadavg()},
           "bandwidth_probes": bw, "compile_s": compile_s, "variants": {}}
    for v in variants:
        r = {"bandwidth_gb_s": gbs, "weight_bytes": wbytes, "floor_ms": floor_ms, "contexts": {}}
        for ctx in contexts:
            s = {t: summarize(times[v][ctx][t]) for t in widths}
            one = s[widths[0]]["median"]
            r["contexts"][str(ctx)] = {
                "ms": {str(t): round(s[t]["median"], 2) for t in widths},
                "iqr_ms": {str(t): [round(x, 2) for x in s[t]["iqr"]] for t in widths},
                "min_ms": {str(t): round(s[t]["min"], 2) for t in widths},
                "ratio_to_one_token": {str(t): round(s[t]["median"] / one, 3) for t in widths},
                "ratio_to_floor": {str(t): round(s[t]["median"] / floor_ms, 3) for t in widths}}
        r["one_token_over_floor"] = r["contexts"][str(contexts[0])]["ratio_to_floor"][str(widths[0])]
        out["variants"][v] = r
    if compiled is not None:
        out["recompiles"] = compiled.recompile_report()
    out['complete'] = final
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"[{'final' if final else 'partial'}] bandwidth {gbs:.1f} GB/s  weights {wbytes/1e6:.0f} MB  floor {floor_ms:.1f} ms  load {os.getloadavg()}")
    for v in variants:
        for ctx in contexts:
            c = out["variants"][v]["contexts"][str(ctx)]
            print(f"{v:9s} ctx={ctx:5d} " + "  ".join(
                f"T={t}:{c['ms'][str(t)]:6.1f} [{c['iqr_ms'][str(t)][0]:.0f}-{c['iqr_ms'][str(t)][1]:.0f}] x{c['ratio_to_one_token'][str(t)]:.2f}"
                for t in widths) + f"  1tok/floor {c['ratio_to_floor'][str(widths[0])]:.2f}")




if __name__ == "__main__":
    main()
