"""Train exit adapters by self-distillation, and measure what they buy.

    from lede.adapters import train_adapter, exit_agreement
    adapter, log = train_adapter(lm, train_set, layer=8, design="linear", vocab=vocab, epochs=6)
    agree = exit_agreement(lm, eval_set, layer=8, adapter=adapter, vocab=vocab)   # [P] bool

The base model stays frozen: an adapter only changes what is *drafted*; verification keeps the output
exactly the model's. The student is ``W_V · norm(adapter(h_L))`` (W_V: the LM head restricted to the
draft vocabulary V, or the full head), the teacher the full model's next-token distribution restricted
to the same V. Losses:

* ``kl``: KL(teacher_V ‖ student_V), teacher renormalised over V — matches the whole distribution;
* ``ce``: cross-entropy to the model's greedy token (positions whose greedy token lies outside V are
  skipped: no draft from V could match them anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lede.distill import DistillSet
from lede.exits import build_adapter
from lede.model import LoadedModel


@dataclass
class TrainLog:
    layer: int
    design: str
    loss: str
    epochs: int
    positions: int
    epoch_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _head_weight(lm: LoadedModel, vocab: torch.Tensor | None) -> torch.Tensor:
    w = lm.model.lm_head.weight.detach().float().cpu()
    return w if vocab is None else w[vocab]


def _norm(lm: LoadedModel) -> nn.Module:
    """A float32 CPU copy of the final norm (training runs in fp32 whatever the model's dtype)."""
    import copy

    return copy.deepcopy(lm.model.model.norm).float().cpu().requires_grad_(False)


def train_adapter(
    lm: LoadedModel,
    data: DistillSet,
    layer: int,
    design: str = "linear",
    vocab: torch.Tensor | None = None,
    loss: str = "kl",
    epochs: int = 6,
    lr: float = 2e-3,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = True,
    **design_options,
) -> tuple[nn.Module, TrainLog]:
    import time

    if loss not in ("kl", "ce"):
        raise ValueError(f"loss={loss!r}: use 'kl' or 'ce'")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    adapter = build_adapter(design, lm.hidden_size, **design_options).float()
    norm, w = _norm(lm), _head_weight(lm, vocab)
    h_all, final_all, target_all = data.hidden[layer].float(), data.final.float(), data.target
    if vocab is not None and loss == "ce":  # map greedy tokens into V; drop those outside it
        pos = torch.full((lm.config.vocab_size,), -1, dtype=torch.long)
        pos[vocab] = torch.arange(len(vocab))
        target_all = pos[target_all]
        keep = target_all >= 0
        h_all, final_all, target_all = h_all[keep], final_all[keep], target_all[keep]
    n = h_all.shape[0]
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log = TrainLog(layer, design, loss, epochs, n)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"adapter L{layer} {design}", disable=not progress, mininterval=10)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for b in range(0, n, batch_size):
            idx = perm[b : b + batch_size]
            student = norm(adapter(h_all[idx])) @ w.T  # [B, |V|]
            if loss == "kl":
                with torch.no_grad():
                    teacher = F.log_softmax(norm(final_all[idx]) @ w.T, dim=-1)
                value = F.kl_div(F.log_softmax(student, -1), teacher, log_target=True, reduction="batchmean")
            else:
                value = F.cross_entropy(student, target_all[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            total += float(value.detach()) * len(idx)
            bar.update()
        log.epoch_loss.append(total / n)
    bar.close()
    log.seconds = time.perf_counter() - t0
    return adapter.eval().requires_grad_(False), log


@torch.no_grad()
def exit_agreement(
    lm: LoadedModel, data: DistillSet, layer: int, adapter: nn.Module | None = None,
    vocab: torch.Tensor | None = None, batch_size: int = 4096,
) -> torch.Tensor:
    """[P] bool: does the exit head's greedy draft equal the model's greedy token at each position?"""
    norm, w = _norm(lm), _head_weight(lm, vocab)
    adapter = adapter.float() if adapter is not None else None
    out = []
    for b in range(0, len(data), batch_size):
        h = data.hidden[layer][b : b + batch_size].float()
        if adapter is not None:
            h = adapter(h)
        best = (norm(h) @ w.T).argmax(-1)
        out.append((vocab[best] if vocab is not None else best) == data.target[b : b + batch_size])
    return torch.cat(out)
