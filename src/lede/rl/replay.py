"""Fast experience by teacher-forced replay: the engine's decision loop, driven by precomputed exit-head and
full-model outputs along the model's own greedy continuations, with no model forward per round.

    from lede.drafters.distill import load_distill
    from lede.rl.replay import ReplayDecoder, replay_tables
    seqs, data, _ = load_distill("results/exits/distill_train.pt")
    dec = ReplayDecoder(lm, replay_tables(lm, heads, seqs, data), max_draft_len=8)
    exp = collect_experience(dec, prompts, behaviours, space, costs, max_new_tokens=128)   # as with a Decoder
    speed = replay_speed(dec, [s.prompt_ids for s in seqs], policy, costs, max_new_tokens=128)  # offline evaluation
    speed.median, speed.aggregate      # speedup over plain decoding, timed by the cost model

**Why it is exact (greedy decoding).** Row j of a sequence in a ``DistillSet`` holds the state that predicts
continuation token c_j (row 0: the prompt's last position). At a round start the engine's pending token is
c_{n-1} (n tokens emitted), so

    draft i of the round (i = 0, 1, ...)   = argmax exit_L(h_L[row n + i])   while drafts 0..i-1 were right
    accepted a                             = number of leading drafts equal to c_n, c_{n+1}, ...
    verification's logits at the bonus     = lm_head(norm(h_N[row n + a])), whose argmax is c_{n+a}

because the layers below L see exactly the greedy prefix (see ``lede.drafters.distill``). So for every policy, the
rounds (exit layer, drafted, accepted), the emitted tokens, ``state.last_verify`` and hence the rewards
equal those of ``Decoder.generate(prompt, policy, max_new_tokens=min(budget, len(continuation)))``, up to
float rounding between a teacher-forced pass and one-token steps (a near-tie argmax; the tests compare).

**What it cannot know.** After a wrong draft the engine keeps drafting *from the wrong token*; the exit
head's confidence there (``state.draft`` at the later "keep drafting?" decisions of that round) is not in
the teacher-forced pass. The replay shows the confidence at the teacher-forced row instead and counts those
decisions (``ReplayDecoder.approx_decisions``). Their outcome is unaffected (acceptance stops at the first
mismatch: every later draft is rejected), but a policy that *reads* the draft confidence (a confidence
threshold, a learned policy) may decide there differently than in the engine. Prompt-lookup drafts (``LOOKUP``) depend on the
context only, never on an earlier draft: they and their decisions replay exactly. Use replay for behaviour
policies that do not (static cells, random schedules, adaptive K, dynamic exit, ε-perturbations of them):
their episodes are then the engine's exactly, and only the logged state at those decisions is approximate.

**Offline evaluation** (``replay_speed``): any policy's replayed rounds, timed by the measured cost model
(a round of K drafts at L costs round_ms(L, K) / plain_ms plain steps and emits A + 1 tokens), give its
speedup over plain decoding without running the model: seconds per policy instead of an hour of
interleaved decoding. For a policy that reads the draft confidence only the doomed drafts' "keep drafting?"
decisions are approximate (their count is reported). It is the cost model's speedup: per-round overheads
(policy time included) and context-length effects are not in it, so it ranks policies; the engine's
interleaved evaluation measures them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from lede.drafters.adapters import head_input
from lede.core.costs import CostModel, round_costs
from lede.drafters.distill import DistillSet, Sequence, accepted_runs
from lede.rl.oracle import Oracle
from lede.core.lookup import lookup_runs
from lede.core.policy import LOOKUP, DecodeState, Policy, RoundRecord, top_prob_margin_entropy
from lede.core.rounds import Draft, Verdict, emit, no_clock, run_round


@dataclass(frozen=True)
class Conf:
    """The ``Confidence`` numbers of one logits row, precomputed (the policy reads the same attributes)."""

    top_prob: float
    entropy: float
    margin: float


@dataclass
class SequenceTable:
    """Per row of one sequence: the continuation token, the full model's confidence, and per exit layer the
    draft token (full-vocabulary id) and the exit head's confidence."""

    prompt_ids: list[int]
    continuation: list[int]
    verify: list[Conf]
    draft_token: dict[int, list[int]]
    draft: dict[int, list[Conf]]


@torch.inference_mode()
def _confidences(logits: torch.Tensor) -> tuple[list[int], list[Conf]]:
    """argmax and (top-1 probability, entropy, top-1 − top-2) per row of [T, V] logits, as ``Confidence``."""
    top, margin, entropy = top_prob_margin_entropy(logits)
    return logits.argmax(-1).tolist(), [Conf(*row) for row in zip(top.tolist(), entropy.tolist(), margin.tolist())]


@torch.inference_mode()
def replay_tables(lm, heads: dict, sequences: list[Sequence], data: DistillSet,
                  progress: bool = True) -> dict[tuple[int, ...], SequenceTable]:
    """One table per sequence with a continuation, keyed by its prompt ids. ``heads[L]`` is the exit head the
    engine drafts with at layer L (``Decoder.head(L)``: adapter, draft vocabulary); ``data`` must hold the
    hidden states of every layer in ``heads`` (``lede.drafters.distill.collect`` on these sequences)."""
    from tqdm.auto import tqdm

    missing = sorted(set(heads) - set(data.layers))
    if missing:
        raise ValueError(f"the distillation data has no hidden states for exit layers {missing} "
                         f"(it has {data.layers}): recollect it with these layers")
    norm, lm_head, dev, dt = lm.model.model.norm, lm.model.lm_head, lm.device, lm.dtype
    tables = {}
    bounds = data.rows_by_sequence(sequences)
    for s_idx, (lo, hi) in tqdm(bounds.items(), desc="replay tables", disable=not progress, mininterval=10):
        s = sequences[s_idx]
        _, verify = _confidences(lm_head(norm(data.final[lo:hi].to(dev, dt))))
        table = SequenceTable(list(s.prompt_ids), list(s.continuation), verify, {}, {})
        for layer, head in heads.items():
            h = head_input(lm, head, data, layer, s, (lo, hi))
            table.draft_token[layer], table.draft[layer] = _confidences(head(h))
        tables[tuple(s.prompt_ids)] = table
    return tables


@dataclass
class ReplayGeneration:
    """What ``collect_experience`` reads from a generation, plus which decisions saw an approximate state."""

    token_ids: list[int]
    rounds: list[RoundRecord]
    finish_reason: str
    approx: list[bool] = field(default_factory=list)  # per policy call, in order


class ReplayDecoder:
    """``generate(prompt_ids, policy, max_new_tokens)`` like ``lede.core.engine.Decoder`` (greedy, no stop strings),
    answered from ``replay_tables`` instead of model forwards. Prompts must be among the tables' prompts."""

    def __init__(self, lm, tables: dict[tuple[int, ...], SequenceTable], max_draft_len: int = 16):
        self.lm, self.tables, self.max_draft_len = lm, tables, max_draft_len
        self.n_layers = lm.num_layers
        self._eos = set(lm.eos_token_ids)
        self.decisions = 0
        self.approx_decisions = 0

    def generate(self, prompt_ids: list[int], policy: Policy, max_new_tokens: int = 128) -> ReplayGeneration:
        table = self.tables.get(tuple(prompt_ids))
        if table is None:
            raise KeyError(f"no replay table for this prompt ({len(prompt_ids)} tokens): replay only the "
                           "distillation sequences it was built from")
        c = table.continuation
        budget = min(max_new_tokens, len(c))  # the engine run this reproduces: max_new_tokens = budget
        policy.reset()
        state = DecodeState(self.n_layers, len(prompt_ids), budget, tokens=[c[0]], prompt_ids=list(prompt_ids))
        state.last_verify = table.verify[0]
        source = _TableSource(table)
        approx: list[bool] = []
        finish = "eos" if c[0] in self._eos else "length"
        while finish == "length" and len(state.tokens) < budget:
            outcome = run_round(state, policy, source, self.max_draft_len, clock=no_clock)
            approx += [not e for e in outcome.exact]
            finish = emit(state, outcome.emitted, self._eos) or "length"
        self.decisions += len(approx)
        self.approx_decisions += sum(approx)
        return ReplayGeneration(state.tokens, state.rounds, finish, approx)


class _TableSource:
    """The replay's :class:`lede.core.rounds.RoundSource`: draft i of a round started with n tokens emitted predicts
    continuation token c[n + i]; the exit head's token and confidence there are the table's while every earlier
    draft of the round was right (its context is then the greedy prefix); after a wrong one the token is unknown
    (-1, rejected whatever it is) and the confidence the teacher-forced row's (``exact`` False)."""

    def __init__(self, table: SequenceTable):
        self.table = table

    def begin(self, state: DecodeState, layer: int | None) -> None:
        if layer is not None and layer != LOOKUP and layer not in self.table.draft_token:
            raise ValueError(f"exit layer {layer} is not in the replay tables ({sorted(self.table.draft_token)})")
        self.n, self.accepted, self.wrong = len(state.tokens), 0, False

    def draft(self, state: DecodeState, layer: int, copied: int | None) -> Draft:
        row = self.n + state.drafted  # this draft predicts c[row]
        if copied is not None:  # lookup: the candidates depend on the context only, exact
            tok, conf, exact = copied, None, True
        else:
            exact = not self.wrong
            tok = self.table.draft_token[layer][row] if exact else -1
            conf = self.table.draft[layer][row]
        if not self.wrong and tok == self.table.continuation[row]:
            self.accepted += 1
        else:
            self.wrong = True
        return Draft(tok, conf, exact)

    def verify(self, state: DecodeState, layer: int | None, drafts: list[int]) -> Verdict:
        n, a = self.n, self.accepted
        return Verdict(a, self.table.continuation[n : n + a + 1], self.table.verify[n + a])


class ReplayOracle(Oracle):
    """The hindsight oracle (``lede.rl.oracle.Oracle``) on replayed sequences: each prompt's accepted run lengths
    come from its replay table (draft token == continuation token, row by row) instead of a model pass.

    ``lookup``: the LOOKUP drafter is a candidate too; ``exits=False`` leaves the exit layers out (``oracle_lookup``,
    with ``lookup``): the best any schedule of prompt lookup alone can do, to read how much of the oracle's lead
    over the static cells is in knowing when an exit draft will be right."""

    def __init__(self, tables: dict[tuple[int, ...], SequenceTable], costs: CostModel, max_draft_len: int = 8,
                 lookup: bool = False, exits: bool = True):
        if not (lookup or exits):
            raise ValueError("ReplayOracle with neither exit layers nor lookup has no drafter: pass lookup=True")
        super().__init__({}, costs, max_draft_len)
        self.tables, self.lookup, self.exits = tables, lookup, exits
        self.name = "oracle" if exits else "oracle_lookup"
        self._runs: dict[tuple[int, ...], dict[int, list[int]]] = {}

    def choose_exit(self, state: DecodeState) -> int | None:
        key = tuple(state.prompt_ids)
        if key not in self._runs:
            table = self.tables[key]
            c = torch.tensor(table.continuation)
            one_seq = torch.zeros_like(c)
            self._runs[key] = {layer: accepted_runs(torch.tensor(drafts) == c, one_seq, max_k=len(c)).tolist()
                               for layer, drafts in table.draft_token.items()} if self.exits else {}
            if self.lookup:
                runs = lookup_runs(table.prompt_ids, table.continuation, max_len=self.max_draft_len)
                self._runs[key][LOOKUP] = runs.run
        self.runs = self._runs[key]
        return super().choose_exit(state)


@dataclass
class ReplayedSpeed:
    """One policy replayed over a set of sequences, timed by the cost model (units: plain decoding steps)."""

    policy: str
    speedups: list[float]  # per sequence: tokens emitted / cost of its rounds
    tokens: int
    cost: float  # Σ round costs over all sequences, in plain steps
    rounds: int
    drafted: int
    accepted: int
    decisions: int
    approx_decisions: int  # decisions that saw an approximate draft confidence (see the module docstring)

    @property
    def median(self) -> float:
        return statistics.median(self.speedups)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.cost

    @classmethod
    def combine(cls, parts: list["ReplayedSpeed"]) -> "ReplayedSpeed":
        """One policy's replays of disjoint sequence sets (e.g. per category) as one (e.g. all categories)."""
        return cls(parts[0].policy, [s for p in parts for s in p.speedups],
                   *[sum(getattr(p, f) for p in parts) for f in ("tokens", "cost", "rounds", "drafted", "accepted",
                                                                "decisions", "approx_decisions")])


def replay_speed(dec: ReplayDecoder, prompts: list[list[int]], policy: Policy, costs: CostModel,
                 max_new_tokens: int = 128) -> ReplayedSpeed:
    """Replay ``policy`` on each prompt (they must be in ``dec``'s tables) and time its rounds with ``costs``:
    a round costs ``costs.round_ms(L, K) / costs.plain_ms`` plain steps (a plain step costs 1) and emits
    A + 1 tokens, so plain decoding replays at exactly 1.0. Rounds with nothing drafted count as plain steps;
    the first token (the prefill's) is not counted, as in the engine's decode-time speed. Each round is
    priced at its context (``CostModel.at``): in plain steps at that context."""
    out = ReplayedSpeed(policy.name, [], 0, 0.0, 0, 0, 0, 0, 0)
    for ids in prompts:
        before, approx_before = dec.decisions, dec.approx_decisions
        gen = dec.generate(ids, policy, max_new_tokens)
        tokens = sum(r.emitted for r in gen.rounds)
        cost = sum(c.round_ms(r.exit_layer, r.drafted) / c.plain_ms
                   for r, c in zip(gen.rounds, round_costs(costs, len(ids), gen.rounds)))
        if gen.rounds:
            out.speedups.append(tokens / cost)
        out.tokens += tokens
        out.cost += cost
        out.rounds += len(gen.rounds)
        out.drafted += sum(r.drafted for r in gen.rounds)
        out.accepted += sum(r.accepted for r in gen.rounds)
        out.decisions += dec.decisions - before
        out.approx_decisions += dec.approx_decisions - approx_before
    if not out.speedups:
        raise ValueError("no replayed rounds: the sequences are too short for this token budget")
    return out


@dataclass
class ReplaySelection:
    """Which of several candidate policies replays fastest on a set of (training) sequences."""

    best: int  # index of the chosen candidate
    medians: list[float]  # per candidate: median replayed speedup over plain decoding


def select_by_replay(dec: ReplayDecoder, prompts: list[list[int]], policies: list[Policy], costs: CostModel,
                     max_new_tokens: int = 128) -> ReplaySelection:
    """The candidate with the highest median replayed speedup (``replay_speed``) on ``prompts``; ties go to the
    earlier one. Used to choose among training restarts of one RL algorithm (``policy.restarts``): offline
    Q-learning from a fixed dataset lands, from seed to seed, on policies whose replayed speed on held-out
    prompts differed by up to 1.3x (1.51-2.00x plain), and replay on the *training* prompts — an exact
    simulation of each candidate's rounds, not a Q estimate — ranked those candidates as the held-out
    prompts did. Never pass evaluation prompts here."""
    if not policies:
        raise ValueError("select_by_replay needs at least one candidate policy")
    medians = [replay_speed(dec, prompts, p, costs, max_new_tokens).median for p in policies]
    return ReplaySelection(max(range(len(medians)), key=lambda i: (medians[i], -i)), medians)
