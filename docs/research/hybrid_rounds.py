"""Do hybrid rounds pay? A hindsight bound on the dev split's teacher-forced sequences (greedy).

Run after the workflow has produced ``results/`` (cost model, exit heads, dev distillation data), ~3 min on 2 threads:

    PYTHONPATH=src python3 docs/research/hybrid_rounds.py results resources/models

Myopic oracle (as lede.rl.oracle.Oracle) over plain steps and (drafter, K) rounds, with and without two hybrid round
kinds: a lookup draft of K1 tokens extended by K2 drafts from exit layer L (the L layers must first run over the K1
lookup tokens: priced as draft_ms[L] * verify_ms[K1] / verify_ms[1]), and K1 exit drafts continued by a lookup of K2
tokens from the drafted context. In hindsight both hybrids take their first part exactly as long as it will be
accepted. Prints per category the median of per-sequence speedups over plain decoding (the dev split, 128 tokens).

Measured 2026-12-07 on the default study of ``9d0f65b`` (72 dev sequences): the bound rises from 1.855x to 1.967x
plain, paired 1.032x (0-6.6% per category; RAG and summarisation most, translation none); hybrids are 198 of 3003
rounds, and 1429 rounds stay plain steps even in hindsight (nothing drafts the next token right). The oracle over
plain steps and lookup drafts alone reaches 1.508x, what static lookup K4 replays at on the same split (1.505x): with
free drafts and flat verification up to 5 tokens, choosing K per round for lookup gains nothing, and all of the
oracle's lead over the best static cell (1.855 vs 1.505) comes from knowing when an exit draft will be right.
"""
import statistics, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
from lede.drafters.distill import accepted_runs, load_distill
from lede.core.engine import Decoder
from lede.core.exits import load_exit_heads, selected_costs
from lede.drafters.loading import load_model
from lede.core.lookup import lookup_runs
from lede.rl.replay import replay_tables

R = Path(sys.argv[1]); MAXK = 8; BUDGET = 128
selected = R / "exits" / "selected.json"
seqs, data, meta = load_distill(R / "exits" / "distill_dev.pt")
lm = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=sys.argv[2])
dec = Decoder(lm, exit_heads=load_exit_heads(lm, selected), max_draft_len=16)
costs = selected_costs(R / "costs.json", selected)
layers = sorted(l for l in costs.draft_ms if l != 0)
tables = replay_tables(lm, {l: dec.head(l) for l in layers}, seqs, data, progress=False)

def runs_of(table, L):  # accepted run length of exit-layer-L drafts from each row (as ReplayOracle computes them)
    c = torch.tensor(table.continuation)
    return accepted_runs(torch.tensor(table.draft_token[L]) == c, torch.zeros_like(c), max_k=16).tolist()

def simulate(table, hybrid, exits=True):
    c = table.continuation
    budget = min(BUDGET, len(c))
    lk = lookup_runs(table.prompt_ids, c, max_len=16)
    runs = {L: runs_of(table, L) for L in layers}
    n, t_ms = 1, 0.0
    kinds = {}
    while n < budget:
        cm = costs.at(len(table.prompt_ids) + n)
        v = cm.verify_ms
        best, choice = 1.0 / v[1], ("plain", 1, v[1])
        def offer(tokens, ms, kind):
            nonlocal best, choice
            if tokens / ms > best:
                best, choice = tokens / ms, (kind, tokens, ms)
        lr, la = (lk.run[n], lk.available[n]) if n < len(lk.run) else (0, 0)
        for k in range(1, min(MAXK, la) + 1):
            offer(min(k, lr) + 1, v[k + 1], "lookup")
        for L in layers if exits else []:
            for k in range(1, MAXK + 1):
                offer(min(k, runs[L][n]) + 1, k * cm.draft_ms[L] + v[k + 1], f"L{L}")
        if hybrid:
            k1 = min(lr, la)  # in hindsight: the lookup tokens that will be accepted
            if 1 <= k1 < MAXK and n + k1 < len(c):
                for L in layers:
                    catch_up = cm.draft_ms[L] * v[k1] / v[1]
                    for k2 in range(1, MAXK - k1 + 1):
                        acc = k1 + min(k2, runs[L][n + k1])
                        offer(acc + 1, catch_up + k2 * cm.draft_ms[L] + v[k1 + k2 + 1], "lookup+exit")
            for L in layers:
                k1 = runs[L][n]
                if 1 <= k1 < MAXK and n + k1 < len(lk.run):
                    r2, a2 = lk.run[n + k1], lk.available[n + k1]
                    for k2 in range(1, min(MAXK - k1, a2) + 1):
                        offer(k1 + min(k2, r2) + 1, k1 * cm.draft_ms[L] + v[k1 + k2 + 1], "exit+lookup")
        kind, tokens, ms = choice
        kinds[kind] = kinds.get(kind, 0) + 1
        tokens = min(tokens, budget - n)
        n += tokens; t_ms += ms
    plain_ms = sum(costs.at(len(table.prompt_ids) + i).verify_ms[1] for i in range(1, budget))
    return plain_ms / t_ms, kinds

rows = {}
allk = {}
for s in seqs:
    t = tables.get(tuple(s.prompt_ids))
    if t is None or len(t.continuation) < 8:
        continue
    base, _ = simulate(t, False)
    look, _ = simulate(t, False, exits=False)
    hyb, kinds = simulate(t, True)
    for k, v in kinds.items():
        allk[k] = allk.get(k, 0) + v
    rows.setdefault(s.category, []).append((base, hyb, look))
    rows.setdefault("all", []).append((base, hyb, look))
for cat, xs in sorted(rows.items()):
    print(f"{cat:16s} n={len(xs):3d} oracle {statistics.median(b for b, _, _ in xs):.3f}  with hybrids "
          f"{statistics.median(h for _, h, _ in xs):.3f} (paired {statistics.median(h / b for b, h, _ in xs):.3f})  "
          f"lookup only {statistics.median(o for _, _, o in xs):.3f} (paired {statistics.median(o / b for b, _, o in xs):.3f})")
print("rounds by kind with hybrids:", allk)
