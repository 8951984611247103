"""Self-distillation data: the model's own greedy continuations (and, for more text, sampled ones:
``sampled_continuations``), teacher-forced, with the hidden state after every candidate exit layer at every position.

    from lede.drafters.distill import greedy_continuations, collect
    seqs = greedy_continuations(lm, [lm.encode_chat(p.text) for p in prompts], max_new_tokens=128)
    data = collect(lm, seqs, layers=[4, 8, 12], categories=[p.category for p in prompts])

Why teacher-forced: for greedy decoding the draft at a position, given that the earlier drafts were
accepted, sees exactly the greedy prefix, so the exit head's prediction on the teacher-forced greedy
sequence *is* the draft the engine would make there. Agreement per position therefore gives the
accepted length of any (L, K) round starting at any position (``accepted_runs``), which the per-layer
report and the policy's fast replay use. ``tests/test_distill.py`` checks this against the engine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lede.core.io import atomic_path, safe_torch_load
from lede.core.model import LoadedModel
from lede.core.policy import DecodeState, Static
from lede.core.rounds import Draft, Verdict, emit, no_clock, run_round


@dataclass
class Sequence:
    prompt_ids: list[int]
    continuation: list[int]  # the model's greedy tokens (sampled ones where ``sampled``)
    category: str = ""
    uid: str = ""
    sampled: bool = False  # extra distillation text (``sampled_continuations``), not what greedy decoding writes


@dataclass
class DistillSet:
    """Positions of continuation tokens, concatenated over sequences, in order.

    Row i holds the state at the token *before* continuation token ``target[i]``: ``hidden[L][i]`` is the
    hidden state after L layers, ``final[i]`` the final-layer hidden state (before the final norm), and
    ``target[i]`` the model's greedy next token. ``seq[i]`` is the sequence index; rows of one sequence
    are consecutive and in order.
    """

    layers: list[int]
    hidden: dict[int, torch.Tensor]  # L -> [P, D]
    final: torch.Tensor  # [P, D]
    target: torch.Tensor  # [P] long
    seq: torch.Tensor  # [P] long
    categories: list[str]  # per sequence

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def rows_by_sequence(self, sequences: list[Sequence]) -> dict[int, tuple[int, int]]:
        """Sequence index -> its rows [lo, hi), in order; checks that the rows belong to ``sequences``."""
        bounds: dict[int, list[int]] = {}
        for row, s in enumerate(self.seq.tolist()):
            bounds.setdefault(s, [row, row])[1] = row + 1
        for s, (lo, hi) in bounds.items():
            n = len(sequences[s].continuation) if s < len(sequences) else None
            if hi - lo != n:
                raise ValueError(f"sequence {s}: {hi - lo} rows for {n} continuation tokens: "
                                 "the distillation data does not belong to these sequences")
        return {s: (lo, hi) for s, (lo, hi) in bounds.items()}

    def select(self, seq_ids: list[int]) -> "DistillSet":
        mask = torch.isin(self.seq, torch.tensor(seq_ids, dtype=torch.long))
        return DistillSet(self.layers, {l: h[mask] for l, h in self.hidden.items()}, self.final[mask],
                          self.target[mask], self.seq[mask], self.categories)


@torch.inference_mode()
def greedy_continuations(
    lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16, progress: bool = True
) -> list[list[int]]:
    """Greedy continuations, batched (left padding; prompts of similar length batched together).

    Batching changes float rounding, so a continuation can differ from unbatched greedy decoding at a
    numerical near-tie; for distillation targets this does not matter."""
    return _continuations(lm, prompts, max_new_tokens, batch_size, progress, sample=None)


@torch.inference_mode()
def sampled_continuations(
    lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float = 1.0,
    seed: int = 0, batch_size: int = 16, progress: bool = True,
) -> list[list[int]]:
    """One continuation per prompt sampled from the model (temperature, nucleus ``top_p``), batched like
    :func:`greedy_continuations`. More distillation text of the model's own kind for the exit adapters: their
    held-out agreement is data-bound (at L2 on the default study's 110 training prompts, 11.6k positions of greedy
    text give 0.205, the same plus 4 sampled continuations per prompt, 58k positions, 0.240; docs/measurement_log.md).
    Reproducible: batch b draws from a generator seeded ``seed + b``, whatever ran before."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to sample (greedy: greedy_continuations)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    return _continuations(lm, prompts, max_new_tokens, batch_size, progress,
                          sample={"temperature": temperature, "top_p": top_p, "seed": seed})


def _continuations(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, progress: bool,
                   sample: dict | None) -> list[list[int]]:
    model, tok = lm.model, lm.tokenizer
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else next(iter(lm.eos_token_ids), 0)
    eos = sorted(lm.eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    how = {"do_sample": False} if sample is None else {"do_sample": True, "temperature": sample["temperature"],
                                                     "top_p": sample["top_p"], "top_k": 0}
    desc = "greedy continuations" if sample is None else "sampled continuations"
    device = torch.device(lm.device)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, mininterval=10):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        # generate() draws from the global generator: seed it per batch, inside a fork that restores it afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if sample is not None:
                torch.manual_seed(sample["seed"] + b)
            gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos or None, **how)
        for row, i in enumerate(idx):
            cont = gen[row, width:].tolist()
            for j, t in enumerate(cont):  # cut at the first EOS (kept), drop padding after it
                if t in lm.eos_token_ids:
                    cont = cont[: j + 1]
                    break
            out[i] = cont
    return out


@torch.no_grad()  # not inference_mode: the stored tensors are trained on
def collect(
    lm: LoadedModel, sequences: list[Sequence], layers: list[int], progress: bool = True,
    store_dtype: torch.dtype = torch.float32,
) -> DistillSet:
    """Teacher-forced forward of every sequence; keep the hidden states at continuation positions."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    want = sorted(set(layers) | {lm.num_layers})
    for l in want:  # output of decoder layer l-1 = hidden state after l layers
        hooks.append(lm.model.model.layers[l - 1].register_forward_hook(
            lambda mod, args, out, l=l: captured.__setitem__(l, out[0] if isinstance(out, tuple) else out)))
    hidden = {l: [] for l in layers}
    finals, targets, seqs = [], [], []
    try:
        for s_idx, s in enumerate(tqdm(sequences, desc="teacher forcing", disable=not progress, mininterval=10)):
            if not s.continuation:
                continue
            ids = s.prompt_ids + s.continuation
            lm.model.model(torch.tensor([ids], device=lm.device))
            start, stop = len(s.prompt_ids) - 1, len(ids) - 1  # positions predicting the continuation
            for l in layers:
                hidden[l].append(captured[l][0, start:stop].to("cpu", store_dtype))
            finals.append(captured[lm.num_layers][0, start:stop].to("cpu", store_dtype))
            targets.append(torch.tensor(s.continuation))
            seqs.append(torch.full((len(s.continuation),), s_idx))
    finally:
        for h in hooks:
            h.remove()
    if not targets:
        raise ValueError("no continuation tokens to learn from: every sequence was empty")
    return DistillSet(layers=list(layers), hidden={l: torch.cat(v) for l, v in hidden.items()},
                      final=torch.cat(finals), target=torch.cat(targets), seq=torch.cat(seqs),
                      categories=[s.category for s in sequences])


def top_vocab(sequences: list[Sequence], size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens of the model's own greedy continuations (ties by token id). Sampled
    continuations do not count: their rarer tokens would widen the draft head (its cost grows with the rows) without
    raising agreement (at L2, coverage of held-out greedy tokens 0.73 -> 0.83 left agreement at 0.20)."""
    counts = Counter(t for s in sequences if not s.sampled for t in s.continuation)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(ranked), dtype=torch.long)


def accepted_runs(agree: torch.Tensor, seq: torch.Tensor, max_k: int) -> torch.Tensor:
    """For each position, how many consecutive drafts from there would be accepted (capped at max_k),
    staying within the position's sequence. agree: [P] bool -> [P] long."""
    a = agree.to(torch.long).tolist()
    s = seq.tolist()
    run = [0] * (len(a) + 1)
    for i in range(len(a) - 1, -1, -1):  # run[i] = a[i] * (1 + run[i+1]) within one sequence
        nxt = run[i + 1] if i + 1 < len(a) and s[i + 1] == s[i] else 0
        run[i] = a[i] * (1 + nxt)
    return torch.tensor(run[: len(a)], dtype=torch.long).clamp(max=max_k)


@dataclass
class ReplayResult:
    tokens: int  # tokens emitted
    rounds: int
    drafted: int
    accepted: int


def replay_static(runs: torch.Tensor, seq: torch.Tensor, draft_len: int) -> ReplayResult:
    """Replay a Static(L, K) policy along teacher-forced greedy sequences through the engine's round loop
    (``lede.core.rounds.run_round``): a round drafts min(K, tokens left - 1) and accepts min(drafted, run) of them,
    emitting that + 1 tokens. ``runs`` comes from ``accepted_runs(agreement at L, seq, K)``. Matches the engine's
    rounds for greedy decoding (tested); the first continuation token comes from the prefill and is not counted."""
    r, s = runs.tolist(), seq.tolist()
    out = ReplayResult(0, 0, 0, 0)
    policy = Static(1, draft_len)  # the layer is a label here: the runs already say what it accepts
    i = 0
    while i < len(r):
        j = i  # the end of this sequence
        while j < len(r) and s[j] == s[i]:
            j += 1
        # row i's token (the first continuation token) comes from the prefill: the state starts with it emitted
        state = DecodeState(2, 0, j - i, tokens=[0])
        source = _RunSource(r, i)
        while len(state.tokens) < state.max_new_tokens:
            emit(state, run_round(state, policy, source, draft_len, clock=no_clock).emitted, ())
        out.rounds += len(state.rounds)
        out.drafted += sum(x.drafted for x in state.rounds)
        out.accepted += sum(x.accepted for x in state.rounds)
        out.tokens += len(state.tokens) - 1
        i = j
    return out


class _RunSource:
    """The static replay's round source: at a round starting at row ``offset + len(tokens)``, verification accepts
    min(drafted, run there) drafts (the run is how many consecutive exit-head tokens from that row agree)."""

    def __init__(self, runs: list[int], offset: int):
        self.runs, self.offset = runs, offset

    def begin(self, state: DecodeState, layer: int | None) -> None:
        self.pos = self.offset + len(state.tokens)

    def draft(self, state: DecodeState, layer: int, copied: int | None) -> Draft:
        return Draft(0)

    def verify(self, state: DecodeState, layer: int | None, drafts: list[int]) -> Verdict:
        a = min(len(drafts), self.runs[self.pos])
        return Verdict(a, [0] * (a + 1), None)


def atomic_torch_save(path, obj) -> None:
    """``torch.save`` to a temporary file, then rename: a crash leaves the old file or none, never half of one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_distill(path, sequences: list[Sequence], data: DistillSet, meta: dict) -> None:
    """One file with the sequences, the hidden states and where they came from (written atomically)."""
    atomic_torch_save(path, {"meta": meta, "sequences": [s.__dict__ for s in sequences], "layers": data.layers,
                             "hidden": data.hidden, "final": data.final, "target": data.target, "seq": data.seq,
                             "categories": data.categories})


def load_distill(path) -> tuple[list[Sequence], DistillSet, dict]:
    blob = safe_torch_load(path, what="distillation data")
    seqs = [Sequence(**s) for s in blob["sequences"]]
    data = DistillSet(blob["layers"], {int(k): v for k, v in blob["hidden"].items()}, blob["final"],
                      blob["target"], blob["seq"], blob["categories"])
    return seqs, data, blob["meta"]


def data_hash(sequences: list[Sequence]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in sequences:
        h.update(repr((s.uid, s.prompt_ids, s.continuation)).encode())
    return h.hexdigest()[:16]


def save_teacher(path, sequences: list[Sequence], meta: dict) -> None:
    """The teacher's (base model's) greedy continuations of a prompt split, with where they came from."""
    atomic_torch_save(path, {"meta": meta, "sequences": [s.__dict__ for s in sequences]})


def load_teacher(path: str | Path) -> tuple[list[Sequence], dict]:
    blob = safe_torch_load(path, what="teacher continuations")
    return [Sequence(**s) for s in blob["sequences"]], blob["meta"]
