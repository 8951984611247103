"""Would an EAGLE-style exit head (the layer-L state fused with the last verified final-layer state) draft better?

Run after the workflow has produced ``results/`` (exit heads, train and eval distillation data), ~20 s on 2 threads (11.6k rows):

    PYTHONPATH=src python3 docs/research/fused_heads.py results resources/models [LAYER]

The linear adapter drafts from h_L(t) alone: norm(h_L + W h_L) -> the draft vocabulary's rows of the LM head. The fused
head also reads f(t-1), the final layer's state one position back, which the engine has for the first draft of every
round (the verification pass computed it; the prefill for the first round): f^(t) = h_L(t) + MLP([norm h_L(t); norm
f(t-1)]) -> the same norm and head rows, trained by the same KL to the model's distribution. A second draft in the
same round has no verified f(t) yet and reads the head's own f^(t) instead (EAGLE feeds its features back): printed
as "chained". Both are trained on the training split's rows (every row but a sequence's first, whose previous state
is in the prompt and whose token the prefill writes), and measured as agreement with the model's greedy token on the
held-out eval split.

Measured 2026-12-07 on the default study of ``9d0f65b`` at L2, the study's 1,899-token draft vocabulary, 6 epochs:
- 11.6k training rows (the greedy continuations of 110 prompts; this script): linear 0.205, fused 0.226 at a round's
  first draft, 0.163 chained;
- 58k rows (the same + 4 sampled continuations per prompt, what ``exits.train.samples: 4`` collects; the same recipe
  run on them before that key existed): linear 0.240, fused 0.303 first draft, 0.218 chained.
The fused head gains with data faster than the linear one (+0.08 vs +0.035 for 5x the rows), but only on a round's
first draft. It is not built: its drafts depend on where the round started (the chain of fed-back states), so the
teacher-forced replay tables, which hold one draft per position and layer and which the static sweep, the oracle,
FullInfo and the full-information data all read, would need one draft per (round start, offset) to stay exact.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lede.drafters.adapters import _head_weight, _norm, train_adapter
from lede.drafters.distill import load_distill
from lede.drafters.loading import load_model

torch.set_num_threads(2)
R, LAYER = Path(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 2
lm = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=sys.argv[2])
import json

vocab = torch.tensor(json.loads((R / "exits" / "selected.json").read_text())["vocab"])
_, train, _ = load_distill(R / "exits" / "distill_train.pt")
_, held, _ = load_distill(R / "exits" / "distill_eval.pt")
norm, w = _norm(lm), _head_weight(lm, vocab)


def previous_final(d):
    """f(t-1) per row, and which rows have it (not a sequence's first)."""
    f = torch.zeros_like(d.final, dtype=torch.float32)
    f[1:] = d.final[:-1].float()
    ok = torch.zeros(len(d), dtype=torch.bool)
    ok[1:] = d.seq[1:] == d.seq[:-1]
    return f, ok


class Fused(nn.Module):
    def __init__(self, d: int, hidden: int = 1024):
        super().__init__()
        self.nh, self.nf = nn.RMSNorm(d), nn.RMSNorm(d)
        self.net = nn.Sequential(nn.Linear(2 * d, hidden), nn.SiLU(), nn.Linear(hidden, d))
        nn.init.zeros_(self.net[-1].weight)  # starts as the plain exit head

    def forward(self, h, f):
        return h + self.net(torch.cat([self.nh(h), self.nf(f)], -1))


def agreement(out, d, rows):
    with torch.no_grad():
        return float((vocab[(norm(out) @ w.T).argmax(-1)] == d.target)[rows].float().mean())


torch.manual_seed(0)
f_train, ok_train = previous_final(train)
f_held, ok_held = previous_final(held)
linear, _ = train_adapter(lm, train, LAYER, "linear", vocab, progress=False)
h, f, final = train.hidden[LAYER][ok_train].float(), f_train[ok_train], train.final[ok_train].float()
fused = Fused(lm.hidden_size)
opt = torch.optim.AdamW(fused.parameters(), lr=2e-3, weight_decay=0.0)
epochs, batch = 6, 512
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * -(-len(h) // batch), pct_start=0.1)
for _ in range(epochs):
    for idx in torch.randperm(len(h)).split(batch):
        with torch.no_grad():
            teacher = F.log_softmax(norm(final[idx]) @ w.T, -1)
        loss = F.kl_div(F.log_softmax(norm(fused(h[idx], f[idx])) @ w.T, -1), teacher, log_target=True,
                        reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
with torch.no_grad():
    hl = held.hidden[LAYER].float()
    first = fused(hl, f_held)
    fed = torch.zeros_like(first)
    fed[1:] = first[:-1]  # a second draft reads the head's own state one position back
    chained_rows = ok_held.clone()
    chained_rows[1:] &= ok_held[:-1]
    print(f"L{LAYER}, {len(train)} training rows: linear {agreement(linear(hl), held, ok_held):.3f}; fused first draft "
          f"{agreement(first, held, ok_held):.3f}, chained {agreement(fused(hl, fed), held, chained_rows):.3f}")
