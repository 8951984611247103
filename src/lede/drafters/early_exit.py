"""An early-exit-trained variant of a base model, by self-distillation (LayerSkip's recipe, teacher = base).

    from lede.drafters.early_exit import Recipe, train_early_exit, save_early_exit
    from lede.drafters.loading import load_model
    base = load_model("smollm2-135m", kernels="torch")
    result = train_early_exit(base, sequences, Recipe(exit_layers=[4, 6, 8]), checkpoint="ee.ckpt")
    save_early_exit("ee.pt", result)
    lm = load_model("smollm2-135m-ee", early_exit_weights="ee.pt")   # base + merged low-rank deltas

Why: the shallow layers of a model never trained for early exit cannot predict its output (the plain
head at L = 4–8 agrees with the full model on 5–12% of tokens; a head-only adapter reaches ~0.25 on
Spec-Bench). LayerSkip trains the model itself so that a shared LM head works at early layers. Here the
student is the base model plus low-rank deltas (LoRA) on its decoder layers, trained toward the *base*
model's next-token distribution p_T at every position of the base model's own greedy continuations of
the training prompts (``lede.drafters.distill``; never evaluation prompts):

    loss = Σ_l w_l · KL(p_T|V ‖ softmax(W_V · norm(h_l)))  +  w_final · KL(p_T ‖ p_S)

h_l is the student's hidden state after l layers, ``norm``/``W`` the model's own final norm and LM head
(shared by every exit), V the draft vocabulary (the exits are used with it at decode time; p_T|V is the
teacher renormalised over V), p_S the student's final-layer distribution. The final term keeps the
variant close to the base model; its remaining difference is the variant's quality cost, measured
by the report (agreement with the base model's greedy tokens, lm-eval scores). The teacher is the same
weights with the deltas switched off, so no second copy of the model is held.

Layer dropout (LayerSkip): during training layer i > 0 is skipped with probability
``layer_dropout · i / (N - 1)``, so later layers learn to cope with earlier ones changing.

Speculative decoding with the variant is exact *for the variant*: its output is the variant's own greedy
output, which differs from the base model's where the fine-tuning moved an argmax. The tables say which
model every number is for.

Training runs on CPU or GPU with the same code (the model's device), shows a progress bar, checkpoints
every ``checkpoint_every`` steps and resumes from the checkpoint when rerun with the same recipe and data;
``budget_s`` bounds its wall time, summed over resumed runs. With a budget, the learning-rate schedule
(linear warm-up, cosine decay) is fitted to it: every ``FIT_EVERY`` steps the run sets its horizon to the steps
the remaining budget buys at the rate of its recent steps (at most ``recipe.steps``), so a budget-cut run
still decays its learning rate to zero instead of stopping high up a schedule sized for steps it never
reaches, and a slow stretch (a busy shared host) does not fix a short schedule for good. The artefact
records the horizon; the checkpoint keeps it and is keyed by the budget too (a run with another budget
starts afresh). Past the budget, training stops at a step boundary regardless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lede.drafters.distill import Sequence, atomic_torch_save, top_vocab
from lede.core.io import load_artefact, safe_torch_load

FORMAT = "lede-early-exit/1"
FIT_EVERY = 5  # a budgeted run refits its schedule's horizon every this many steps, from its last FIT_WINDOW
FIT_WINDOW = 30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
log = logging.getLogger(__name__)


class EarlyExitError(ValueError):
    """An early-exit artefact or recipe that does not fit the model it is used with."""


@dataclass
class Recipe:
    """How the variant is trained. Every field is a config value (``config/schema.yaml``: early_exit)."""

    exit_layers: list[int]  # exits trained toward the teacher (1 <= l < N)
    exit_weights: list[float] | None = None  # per exit; None = 1 each
    final_weight: float = 1.0  # weight of the final-layer term (keeps the variant close to the base)
    rank: int = 16  # LoRA rank; 0 = full fine-tuning of the decoder layers
    alpha: float = 32.0  # LoRA scale alpha / rank
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    lora_layers: int = 0  # deltas on decoder layers [0, n); 0 = all layers
    layer_dropout: float = 0.0  # max skip probability (deepest layer); 0 = off
    lr: float = 1e-3
    steps: int = 400  # optimiser steps (one step = ``batch`` sequences)
    batch: int = 2
    max_context: int = 320  # tokens per training sequence: continuation + the prompt's tail
    vocab_size: int = 4096  # draft vocabulary for the exit terms; 0 = the full LM head
    autocast: str = "none"  # "bfloat16": mixed precision for the student/teacher forwards (faster on CPUs with AVX512-BF16 and on GPUs)
    seed: int = 0

    def validate(self, num_layers: int) -> None:
        bad = [l for l in self.exit_layers if not 1 <= l < num_layers]
        if not self.exit_layers or bad:
            raise EarlyExitError(f"early_exit exit_layers={self.exit_layers}: need at least one, each in 1..{num_layers - 1}")
        if self.exit_weights is not None and len(self.exit_weights) != len(self.exit_layers):
            raise EarlyExitError(f"exit_weights={self.exit_weights} needs one weight per exit layer {self.exit_layers}")
        if self.rank < 0 or self.steps < 1 or self.batch < 1 or self.max_context < 8 or self.lr <= 0:
            raise EarlyExitError(f"bad early-exit recipe {self}: rank >= 0, steps >= 1, batch >= 1, max_context >= 8, lr > 0")
        if self.autocast not in ("none", "bfloat16"):
            raise EarlyExitError(f"autocast={self.autocast!r}: use 'none' or 'bfloat16'")
        if not 0 <= self.layer_dropout < 1:
            raise EarlyExitError(f"layer_dropout={self.layer_dropout} must be in [0, 1)")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise EarlyExitError(f"unknown LoRA targets {sorted(unknown)}: choose from {list(TARGETS)}")

    def weights(self) -> list[float]:
        return list(self.exit_weights) if self.exit_weights is not None else [1.0] * len(self.exit_layers)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) · B A x, B zero-initialised (so an untrained delta is the base model).
    ``enabled = False`` gives the base model back (the teacher)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        out_f, in_f = base.weight.shape
        self.A = nn.Parameter(torch.empty(rank, in_f, dtype=base.weight.dtype, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.A.T @ self.B.T) * self.scale
        return y

    def delta(self) -> torch.Tensor:  # [out, in]
        return (self.B @ self.A) * self.scale


def _targets(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear the recipe trains."""
    layers = model.model.layers
    n = recipe.lora_layers or len(layers)
    found = []
    for i, layer in enumerate(layers[:n]):
        for parent_name, parent in layer.named_modules():
            for attr in recipe.targets:
                child = getattr(parent, attr, None)
                if isinstance(child, nn.Module) and hasattr(child, "weight") and child.weight.dim() == 2:
                    name = f"model.layers.{i}.{parent_name + '.' if parent_name else ''}{attr}"
                    found.append((name, parent, attr))
    if not found:
        raise EarlyExitError(f"no linear layers named {recipe.targets} in {type(model).__name__}'s decoder layers")
    return found


def attach_lora(model: nn.Module, recipe: Recipe) -> dict[str, LoRALinear]:
    """Wrap the recipe's target linears with LoRA (rank > 0) in place; returns them by name."""
    wrapped = {}
    for name, parent, attr in _targets(model, recipe):
        module = LoRALinear(getattr(parent, attr), recipe.rank, recipe.alpha)
        setattr(parent, attr, module)
        wrapped[name] = module
    return wrapped


def _set_enabled(modules, on: bool) -> None:
    for m in modules:
        m.enabled = on


@dataclass
class EarlyExitResult:
    """What ``save_early_exit`` writes: the deltas (LoRA factors or full weight deltas) and their provenance."""

    base_model: str
    num_layers: int
    recipe: Recipe
    data_hash: str
    deltas: dict[str, dict[str, torch.Tensor]]  # name -> {"A", "B", "scale"} or {"delta"}
    vocab: list[int] | None  # the draft vocabulary the exits were trained for
    steps_done: int = 0
    stopped_by_budget: bool = False  # the budget cut training short of recipe.steps (its schedule, or a hard stop)
    seconds: float = 0.0  # training wall time, summed over resumed runs
    loss_curve: list[dict] = field(default_factory=list)  # per step: step, learning rate, loss, per-term losses
    horizon: int = 0  # the steps the learning-rate schedule decayed over (recipe.steps, or what the budget bought)


def _window(s: Sequence, max_context: int) -> tuple[list[int], int]:
    """(token ids, index of the first position whose target is a continuation token). Keeps the whole
    continuation when it fits, and the tail of the prompt before it."""
    ids = s.prompt_ids + s.continuation
    ids = ids[-max_context:]
    first = max(len(ids) - len(s.continuation) - 1, 0)
    return ids, first


def _forward(model: nn.Module, ids: torch.Tensor, capture: list[int], skip: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states after ``capture`` layers ([B, T, D]); the final one before the norm. No cache: the
    attention is causal by default for T > 1 without a mask."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    pe = inner.rotary_emb(h, pos)
    out = {}
    for i, layer in enumerate(inner.layers):
        if i not in skip:
            h = layer(h, attention_mask=None, position_embeddings=pe, use_cache=False)
            h = h[0] if isinstance(h, tuple) else h
        if i + 1 in capture:
            out[i + 1] = h
    return out


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position, averaged: teacher given as log-probs."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), teacher_logp, log_target=True, reduction="batchmean")


def train_early_exit(
    lm,
    sequences: list[Sequence],
    recipe: Recipe,
    data_hash: str = "",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 25,
    budget_s: float | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> EarlyExitResult:
    """Train the variant's deltas on ``sequences`` (the base model's greedy continuations of training
    prompts). ``lm`` is the base model (loaded with ``kernels="torch"``); it is modified in place
    (deltas attached) and restored before returning. ``clock`` measures the budget (tests pass a fake one)."""
    t0 = clock()
    model = lm.model
    n_layers = lm.num_layers
    recipe.validate(n_layers)
    seqs = [s for s in sequences if s.continuation]
    if not seqs:
        raise EarlyExitError("no training sequence has a continuation: produce the distillation data first")
    torch.manual_seed(recipe.seed)
    vocab = top_vocab(seqs, recipe.vocab_size) if recipe.vocab_size else None
    dev = lm.device
    w_head = model.lm_head.weight  # [V, D]
    w_v = w_head[vocab.to(dev)] if vocab is not None else w_head
    norm = model.model.norm

    full_ft = recipe.rank == 0
    originals = {}
    if full_ft:
        from lede.core.kernels import CpuLinear

        if any(isinstance(m, CpuLinear) for m in model.modules()):
            raise EarlyExitError("full fine-tuning needs the model loaded with kernels=\"torch\"")
        params = [getattr(parent, attr).weight for _, parent, attr in _targets(model, recipe)]
        for name, parent, attr in _targets(model, recipe):
            originals[name] = getattr(parent, attr).weight.detach().clone()
        lora: dict[str, LoRALinear] = {}
    else:
        lora = attach_lora(model, recipe)
        params = [p for m in lora.values() for p in (m.A, m.B)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    plan = {"horizon": recipe.steps, "fitted": False}  # the schedule's length; fitted to the budget below

    def lr_factor(s: int) -> float:  # linear warm-up over 5% of the horizon, cosine decay to 0 at the horizon
        h = plan["horizon"]
        return min(1.0, (s + 1) / max(1, h // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, h) / h))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    key = _fingerprint(lm.name, recipe, data_hash, budget_s)
    step, curve, earlier_s = 0, [], 0.0  # earlier_s: training time of the runs this one resumes
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        blob = safe_torch_load(ckpt, EarlyExitError, "early-exit training checkpoint", map_location=dev)
        if blob.get("key") == key:
            for p, v in zip(params, blob["params"]):
                p.data.copy_(v)
            opt.load_state_dict(blob["opt"])
            sched.load_state_dict(blob["sched"])
            step, curve, earlier_s = blob["step"], blob["curve"], blob.get("seconds", 0.0)
            plan.update(blob.get("plan", {}))
            log.info("resumed early-exit training from %s at step %d/%d", ckpt, step, plan["horizon"])
        else:
            log.warning("checkpoint %s is for another recipe, data or budget: starting afresh", ckpt)

    rng = random.Random(f"{recipe.seed}:{step}")
    order = list(range(len(seqs)))
    weights = recipe.weights()
    capture = sorted(set(recipe.exit_layers) | {n_layers})
    stopped = False
    step_ends: list[float] = []  # this run's step end times, to fit the schedule to the budget
    bar = tqdm(total=plan["horizon"], initial=step, desc="early-exit self-distillation", disable=not progress, mininterval=10)
    model.train(False)  # no dropout inside transformers' layers; ours is layer dropout below
    while step < plan["horizon"]:
        if budget_s is not None and len(step_ends) > FIT_EVERY and step % FIT_EVERY == 0:
            # a run's first step carries one-off costs (not timed); the recent steps (checkpoints included; the
            # sequences' lengths vary) give the rate, and a 5% margin keeps the schedule inside the budget
            window = step_ends[-FIT_WINDOW - 1:]
            per_step = (window[-1] - window[0]) / (len(window) - 1)
            affordable = int(0.95 * (budget_s - earlier_s - (clock() - t0)) / per_step)
            horizon = max(step + 1, min(recipe.steps, step + affordable))
            if not plan["fitted"] or abs(horizon - plan["horizon"]) > max(2, plan["horizon"] // 50):
                log.info("%.1f s a step: the %.0f s budget buys %d of %d steps; the schedule now decays over %d",
                         per_step, budget_s, horizon, recipe.steps, horizon)
            plan.update(horizon=horizon, fitted=True)
            bar.total = horizon
        if budget_s is not None and earlier_s + clock() - t0 > budget_s:
            stopped = True
            log.warning("early-exit training stopped by its budget (%.0f s) at step %d/%d", budget_s, step, recipe.steps)
            break
        batch = [seqs[rng.choice(order)] for _ in range(recipe.batch)]
        skip = {i for i in range(1, n_layers) if rng.random() < recipe.layer_dropout * i / (n_layers - 1)}
        terms = {f"L{l}": 0.0 for l in recipe.exit_layers} | {"final": 0.0}
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s in batch:
            ids_list, first = _window(s, recipe.max_context)
            ids = torch.tensor([ids_list], device=dev)
            amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=recipe.autocast == "bfloat16")
            with torch.no_grad(), amp:  # teacher: the base model (deltas off), all layers, no dropout
                _set_enabled(lora.values(), False)
                if full_ft:
                    _swap(model, recipe, originals)
                t_logits = model.lm_head(norm(_forward(model, ids, [n_layers], set())[n_layers]))[0, first:].float()
                if full_ft:
                    _swap(model, recipe, originals)
                _set_enabled(lora.values(), True)
                t_logp = F.log_softmax(t_logits, -1)
                t_logp_v = F.log_softmax(t_logits[:, vocab.to(dev)], -1) if vocab is not None else t_logp
            with amp:
                hidden = _forward(model, ids, capture, skip)
                exit_logits = [norm(hidden[l][0, first:]) @ w_v.T for l in recipe.exit_layers]
                final_logits = model.lm_head(norm(hidden[n_layers][0, first:]))
            loss = torch.zeros((), device=dev)
            for l, w, logits in zip(recipe.exit_layers, weights, exit_logits):
                value = _kl(t_logp_v, logits)
                loss = loss + w * value
                terms[f"L{l}"] += float(value.detach()) / len(batch)
            value = _kl(t_logp, final_logits)
            loss = loss + recipe.final_weight * value
            terms["final"] += float(value.detach()) / len(batch)
            (loss / len(batch)).backward()
            total += float(loss.detach()) / len(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        curve.append({"step": step, "lr": lr, "loss": total, **terms})
        bar.update()
        bar.set_postfix(loss=f"{total:.3f}", **{k: f"{v:.2f}" for k, v in terms.items()})
        if ckpt is not None and (step % checkpoint_every == 0 or step == plan["horizon"]):
            atomic_torch_save(ckpt, {"key": key, "params": [p.detach() for p in params], "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step, "curve": curve, "plan": dict(plan),
                                "seconds": earlier_s + clock() - t0})
        step_ends.append(clock())
    bar.close()

    if full_ft:
        deltas = {}
        for name, parent, attr in _targets(model, recipe):
            weight = getattr(parent, attr).weight
            deltas[name] = {"delta": (weight.detach() - originals[name]).cpu()}
            weight.data.copy_(originals[name])
            weight.requires_grad_(False)
    else:
        deltas = {name: {"A": m.A.detach().cpu(), "B": m.B.detach().cpu(), "scale": torch.tensor(m.scale)}
                  for name, m in lora.items()}
        detach_lora(model)
    return EarlyExitResult(lm.name, n_layers, recipe, data_hash, deltas,
                           vocab.tolist() if vocab is not None else None, step,
                           stopped or plan["horizon"] < recipe.steps, earlier_s + clock() - t0, curve,
                           horizon=plan["horizon"])


def _swap(model, recipe, originals) -> None:
    """Full fine-tuning: swap the trained weights with the originals (the teacher) and back."""
    for name, parent, attr in _targets(model, recipe):
        w = getattr(parent, attr).weight
        tmp = w.detach().clone()
        w.data.copy_(originals[name])
        originals[name] = tmp


def detach_lora(model: nn.Module) -> None:
    """Put the base linears back (training is over; the deltas live in the result)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.base)


def _fingerprint(model: str, recipe: Recipe, data_hash: str, budget_s: float | None) -> str:
    return hashlib.sha256(json.dumps([model, asdict(recipe), data_hash, budget_s], sort_keys=True).encode()).hexdigest()[:16]


def save_early_exit(path: str | Path, result: EarlyExitResult, metrics: dict | None = None) -> None:
    """One file (written atomically) with the deltas, the base model id, the recipe and the data hash."""
    meta = {"base_model": result.base_model, "num_layers": result.num_layers, "recipe": asdict(result.recipe),
            "data_hash": result.data_hash, "steps_done": result.steps_done,
            "stopped_by_budget": result.stopped_by_budget, "horizon": result.horizon, "seconds": result.seconds,
            "loss_curve": result.loss_curve, "metrics": metrics or {}}
    atomic_torch_save(Path(path), {"format": FORMAT, "meta": meta, "deltas": result.deltas, "vocab": result.vocab})


def read_early_exit(path: str | Path) -> dict:
    return load_artefact(path, FORMAT, EarlyExitError, "early-exit weights",
                         "train them first (snakemake early_exit) or fix the path")


@torch.no_grad()
def merge_early_exit(model: nn.Module, base_name: str, blob: dict, path: str = "") -> dict:
    """Add the artefact's deltas into the model's weights in place (W += scale · B A); returns its meta.
    Refuses an artefact made for another base model or depth."""
    meta = blob["meta"]
    problems = []
    if meta["base_model"] != base_name:
        problems.append(f"base model {meta['base_model']!r} (loading onto {base_name!r})")
    if meta["num_layers"] != int(model.config.num_hidden_layers):
        problems.append(f"{meta['num_layers']} layers (model has {model.config.num_hidden_layers})")
    if problems:
        raise EarlyExitError(f"early-exit weights {path} were trained for " + ", ".join(problems)
                             + ": train them for this model (snakemake early_exit with model set to it)")
    params = dict(model.named_parameters())
    for name, d in blob["deltas"].items():
        weight = params.get(f"{name}.weight")
        if weight is None:
            raise EarlyExitError(f"early-exit weights {path}: {name} is not a linear layer of {base_name}")
        delta = d["delta"] if "delta" in d else (d["B"].double() @ d["A"].double()) * float(d["scale"])
        if delta.shape != weight.shape:
            raise EarlyExitError(f"early-exit weights {path}: {name} has shape {tuple(delta.shape)}, model {tuple(weight.shape)}")
        weight.add_(delta.to(weight.device, weight.dtype))
    return meta


# ---- measuring a variant against its base ----------------------------------------------------------------


@dataclass
class Agreement:
    """Matches and positions per sequence (a rate's bootstrap resamples sequences, not tokens)."""

    matches: list[int]
    positions: list[int]
    categories: list[str]

    def rate(self, category: str | None = None) -> float:
        idx = [i for i, c in enumerate(self.categories) if category in (None, c)]
        n = sum(self.positions[i] for i in idx)
        return sum(self.matches[i] for i in idx) / n if n else float("nan")

    def interval(self, category: str | None = None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% percentile bootstrap interval of the rate, resampling sequences."""
        import numpy as np

        idx = [i for i, c in enumerate(self.categories) if category in (None, c) and self.positions[i]]
        if len(idx) < 2:
            return float("nan"), float("nan")
        m, n = np.array([self.matches[i] for i in idx], float), np.array([self.positions[i] for i in idx], float)
        pick = np.random.default_rng(seed).integers(0, len(idx), size=(n_boot, len(idx)))
        rates = m[pick].sum(1) / n[pick].sum(1)
        return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


@torch.no_grad()
def teacher_forced_agreement(lm, sequences: list[Sequence], layers: list[int], vocab: list[int] | None = None,
                             progress: bool = True) -> dict:
    """Teacher-force ``lm`` on each sequence and compare, at every continuation position, with the
    sequence's own next token: key "final" = the model's greedy token, key l = the plain exit head at layer
    l (final norm + LM head over ``vocab``). For a model's own greedy continuations, "final" is ~1 and l
    is the exit's draft agreement; for another model's, "final" is the token agreement between the two."""
    model = lm.model
    w = model.lm_head.weight if vocab is None else model.lm_head.weight[torch.tensor(vocab, device=lm.device)]
    v = torch.tensor(vocab, device=lm.device) if vocab is not None else None
    keys: list = ["final", *layers]
    out = {k: Agreement([], [], []) for k in keys}
    for s in tqdm(sequences, desc=f"teacher forcing {lm.name}", disable=not progress, mininterval=10):
        if not s.continuation:
            continue
        ids = torch.tensor([s.prompt_ids + s.continuation], device=lm.device)
        res = model(ids, output_hidden_states=True)
        first = len(s.prompt_ids) - 1
        target = ids[0, first + 1:]
        preds = {"final": res.logits[0, first:-1].argmax(-1)}
        for l in layers:
            best = (model.model.norm(res.hidden_states[l][0, first:-1]) @ w.T).argmax(-1)
            preds[l] = v[best] if v is not None else best
        for k in keys:
            out[k].matches.append(int((preds[k] == target).sum()))
            out[k].positions.append(int(target.numel()))
            out[k].categories.append(s.category)
    return out
