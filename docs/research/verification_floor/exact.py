"""Exactness of the fast path (issue 40, item 3), teacher-forced on real text (Spec-Bench questions).

python /work/scratch40/exact.py [--positions 300] [--compiled]

For every position p of a token stream (a prefix of `--prefix` tokens is prefilled first) we get next-token logits
  ref1   lede's Decoder, transformers' layers (kernels="torch"), one token per pass (= plain decoding)
  fast1  fast.FastLM (oneDNN-prepacked), one token per pass
  fastT  fast.FastLM, T-token passes (T = 5 and 9) over consecutive chunks (= verification passes)
  (comp1 / compT: compiled.CompiledLM, likewise, with --compiled)
and report max |logit diff|, argmax disagreement counts, the top-2 margin of the reference at each
disagreement (near-tie?), and whether 1-token and T-token passes are bit-identical (batch invariance).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from fast import load, rope_tables  # noqa: E402


def stream(lm, n: int) -> torch.Tensor:
    ids: list[int] = []
    with open("/work/shared/data/spec_bench/question.jsonl") as f:
        for line in f:
            q = json.loads(line)
            ids += lm.encode_chat(q["turns"][0])
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


def run_fast(fn, ids, prefix, T):
    """fn(ids_chunk, pos0) -> logits [t, V]; prefill then chunks of T -> logits for positions prefix..end-1."""
    fn(ids[:prefix], 0)
    out = []
    for p in range(prefix, len(ids), T):
        out.append(fn(ids[p : p + T], p))
    return torch.cat(out)


def compare(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> dict:
    am, bm = a.argmax(-1), b.argmax(-1)
    diff = (am != bm).nonzero().flatten().tolist()
    top2 = ref.topk(2, dim=-1).values
    margins = [round(float(top2[i, 0] - top2[i, 1]), 5) for i in diff]
    return {"max_abs_logit_diff": float((a - b).abs().max()), "bit_identical": bool(torch.equal(a, b)),
            "argmax_differs": len(diff), "positions": len(am), "ref_top2_margin_at_differences": margins,
            "median_ref_top2_margin": float((top2[:, 0] - top2[:, 1]).median())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=300)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--out", default="/work/scratch40/results/exact.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "snap"))
    from lede.engine import Decoder

    lm, fl = load("onednn", kernels="torch")
    ids = stream(lm, a.prefix + a.positions)
    n = len(ids)
    cos, sin = rope_tables(lm, n + 32)
    res = {}
    with torch.inference_mode():
        dec = Decoder(lm)
        cache = dec.new_cache(n + 32)
        dec._layers(dec.embed(ids[None, : a.prefix]), 0, dec.n_layers, cache)
        ref1 = torch.cat([dec._verify([int(t)], None, cache) for t in ids[a.prefix :]])
        k = torch.zeros(30, 1, 3, n + 32, 64)
        v = torch.zeros_like(k)
        fast = lambda chunk, p: fl.full(chunk, k, v, p, cos, sin)  # noqa: E731
        outs = {f"fast{T}": run_fast(fast, ids, a.prefix, T) for T in (1, 5, 9)}
        if a.compiled:
            from compiled import CompiledLM
            c = CompiledLM(lm, n + 32)
            for T in (1, 5, 9):
                outs[f"comp{T}"] = run_fast(c.verify, ids, a.prefix, T)
    for name, o in outs.items():
        res[f"ref1 vs {name}"] = compare(ref1, o, ref1)
    for fam in ("fast", "comp"):
        for T in (5, 9):
            if f"{fam}{T}" in outs:
                res[f"{fam}1 vs {fam}{T} (batch invariance)"] = compare(outs[f"{fam}1"], outs[f"{fam}{T}"], ref1)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    json.dump(res, open(a.out, "w"), indent=1)
    for k_, r in res.items():
        print(f"{k_:38s} maxdiff {r['max_abs_logit_diff']:.2e} bit-identical {r['bit_identical']} "
              f"argmax differs {r['argmax_differs']}/{r['positions']} margins {r['ref_top2_margin_at_differences']}")


if __name__ == "__main__":
    main()
