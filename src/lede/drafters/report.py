"""The per-layer exit report and the replayed static sweep.

For every candidate exit layer and head (``plain``: final norm + full LM head; ``plain_V``: the same on
the reduced draft vocabulary; ``<design>_V``: a trained adapter on it) this computes, per category,
the agreement of the exit head's greedy draft with the model's greedy token, and for every draft
length K the replay of Static(L, K) over the model's own greedy continuations (exact for greedy
decoding, see ``lede.drafters.distill``): mean tokens per round and speedup over plain decoding under the
measured cost model. Heads are *selected* per layer and the best static cells are *chosen* on the
training data only; the evaluation data only reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lede.drafters.adapters import exit_agreement
from lede.core.costs import CostModel
from lede.drafters.distill import DistillSet, accepted_runs, replay_static

ALL = "all"


@dataclass
class ReportRow:
    split: str  # train (distillation prompts) | dev (training prompts never distilled on) | eval (held out)
    category: str
    layer: int
    head: str
    agreement: float
    positions: int
    draft_len: int
    tokens_per_round: float
    replay_speedup: float


def _by_category(data: DistillSet) -> dict[str, list[int]]:
    cats: dict[str, list[int]] = {ALL: sorted(set(data.seq.tolist()))}
    for i in cats[ALL]:
        cats.setdefault(data.categories[i], []).append(i)
    return cats


def exit_rows(
    lm, data: DistillSet, split: str, heads: dict[str, tuple[nn.Module | None, torch.Tensor | None]],
    layers: list[int], draft_lens: list[int], costs: CostModel, sequences: list | None = None,
) -> list[ReportRow]:
    """``heads`` maps a head name (``<design>[_V<size>]`` or ``plain[_V<size>]``) to (adapter per layer or None,
    vocab or None); adapters are looked up as ``adapter[layer]`` when a dict is given. ``sequences``: the
    data's sequences, needed by context (``decoder``) adapters. Each head's draft is priced by its design's
    measured cost (``CostModel.draft_design_ms``) where the cost model has it."""
    rows = []
    groups = _by_category(data)
    for layer in layers:
        for head, (adapters, vocab) in heads.items():
            adapter = adapters.get(layer) if isinstance(adapters, dict) else adapters
            if isinstance(adapters, dict) and adapter is None:
                continue
            agree = exit_agreement(lm, data, layer, adapter, vocab, sequences=sequences)
            for cat, seq_ids in groups.items():
                mask = torch.isin(data.seq, torch.tensor(seq_ids))
                a, s = agree[mask], data.seq[mask]
                for k in draft_lens:
                    rep = replay_static(accepted_runs(a, s, k), s, k)
                    time_ms = _replay_ms(rep, layer, k, costs, head)
                    speedup = rep.tokens * costs.plain_ms / time_ms if time_ms else float("nan")
                    rows.append(ReportRow(split, cat, layer, head, float(a.float().mean()), int(a.numel()), k,
                                          rep.tokens / max(rep.rounds, 1), speedup))
    return rows


def lookup_rows(data: DistillSet, split: str, sequences: list, draft_lens: list[int],
                costs: CostModel) -> list[ReportRow]:
    """The prompt-lookup drafter (``LOOKUP``, "layer 0", head ``lookup``) replayed as Static(LOOKUP, K) along the
    same greedy continuations: a round drafts min(K, the candidates there) tokens, or is a plain step where the
    lookup finds none. ``agreement``: the share of rows whose first candidate exists and is right."""
    from lede.core.lookup import lookup_runs
    from lede.core.policy import LOOKUP

    per_seq = {i: lookup_runs(sequences[i].prompt_ids, sequences[i].continuation, max_len=max(draft_lens))
               for i in data.rows_by_sequence(sequences)}
    rows = []
    for cat, seq_ids in _by_category(data).items():
        runs = [per_seq[i] for i in seq_ids if i in per_seq]
        first = [r > 0 for lr in runs for r in lr.run[1:]]
        for k in draft_lens:
            tokens, rounds, ms = 0, 0, 0.0
            for lr in runs:
                pos, end = 1, len(lr.run)  # row 0's token comes from the prefill
                while pos < end:
                    drafted = min(k, lr.available[pos], end - pos - 1)
                    a = min(drafted, lr.run[pos])
                    ms += costs.round_ms(LOOKUP, drafted) if drafted else costs.plain_ms
                    tokens, rounds, pos = tokens + a + 1, rounds + 1, pos + a + 1
            rows.append(ReportRow(split, cat, LOOKUP, "lookup", sum(first) / max(len(first), 1), len(first), k,
                                  tokens / max(rounds, 1), tokens * costs.plain_ms / ms if ms else float("nan")))
    return rows


def lookup_markdown(rows: list[ReportRow]) -> str:
    """The prompt-lookup rows as a table: per split and category, the share of rounds whose first candidate is
    right, and the replayed speedup per K."""
    if not rows:
        return ""
    ks = sorted({r.draft_len for r in rows})
    out = ["", "## Prompt lookup (layer 0), replayed: first candidate right / speedup per K", "",
           "| split | category | first right | " + " | ".join(f"K={k}" for k in ks) + " |",
           "|---|---|---|" + "---|" * len(ks)]
    for split, cat in dict.fromkeys((r.split, r.category) for r in rows):
        mine = {r.draft_len: r for r in rows if (r.split, r.category) == (split, cat)}
        first = next(iter(mine.values())).agreement
        speed = " | ".join(f"{mine[k].replay_speedup:.3f}" for k in ks)
        out.append(f"| {split} | {cat} | {first:.3f} | {speed} |")
    return "\n".join(out) + "\n"


def _replay_ms(rep, layer: int, k: int, costs: CostModel, head: str) -> float:
    """Time of the replayed rounds: the drafted tokens, and a (K+1)-token verification per round (a
    short final round is charged a full verification: a small, conservative overestimate). Priced at the
    cost model's base context (aggregate counts carry no positions); ``lede.rl.replay.replay_speed`` prices
    each round at its own context."""
    return rep.drafted * costs.head_draft_ms(head, layer) + rep.rounds * costs.verify_ms[k + 1]


def select_heads(rows: list[ReportRow], split: str = "dev") -> dict[int, str]:
    """Per layer, the head with the best replayed speedup (at its best K) on ``split``: by default the dev
    split, training prompts the adapters were not distilled on (on their own training prompts a
    higher-capacity adapter looks better than it is)."""
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r.split == split and r.category == ALL and r.replay_speedup > best.get(r.layer, (-1.0, ""))[0]:
            best[r.layer] = (r.replay_speedup, r.head)
    if not best:
        raise ValueError(f"no {split!r} rows to select the exit heads on")
    return {layer: head for layer, (_, head) in best.items()}


def best_cells(rows: list[ReportRow], selected: dict[int, str], top: int, split: str = "dev") -> list[dict]:
    """The ``top`` static (L, K) cells by replayed speedup on ``split``, with the selected head per layer."""
    cells = [r for r in rows if r.split == split and r.category == ALL and selected.get(r.layer) == r.head]
    cells.sort(key=lambda r: -r.replay_speedup)
    return [{"exit_layer": r.layer, "draft_len": r.draft_len, "head": r.head,
             "replay_speedup": round(r.replay_speedup, 4), "agreement": round(r.agreement, 4)}
            for r in cells[:top]]


def markdown(rows: list[ReportRow], selected: dict[int, str], costs: CostModel) -> str:
    """Agreement per layer and head on held-out prompts (overall and per category), and the best K."""
    ev = [r for r in rows if r.split == "eval"]
    heads = list(dict.fromkeys(r.head for r in ev))
    cats = sorted({r.category for r in ev} - {ALL})
    out = [f"# Exit heads ({costs.model}, {costs.dtype}, {costs.device}, {costs.threads} threads)", "",
           f"Plain step {costs.plain_ms:.1f} ms; verifying K+1 tokens: "
           + ", ".join(f"{t - 1}:{v / costs.plain_ms:.2f}x" for t, v in sorted(costs.verify_ms.items())), "",
           "## Agreement with the model's greedy token, held-out prompts (all categories)", "",
           f"| layer | draft ms (plain / {' / '.join(['configured', *costs.draft_design_ms])}) | " + " | ".join(heads)
           + " | selected (on dev) |",
           "|---|---|" + "---|" * len(heads) + "---|"]
    agree = {(r.layer, r.head, r.category): r.agreement for r in ev if r.draft_len == ev[0].draft_len}
    for layer in sorted({r.layer for r in ev}):
        cells = [f"{agree[(layer, h, ALL)]:.3f}" if (layer, h, ALL) in agree else "–" for h in heads]
        ms = [costs.draft_plain_ms.get(layer), costs.draft_ms.get(layer), *(d.get(layer) for d in costs.draft_design_ms.values())]
        out.append(f"| {layer} | {' / '.join(f'{m:.1f}' if m is not None else '–' for m in ms)} | "
                   + " | ".join(cells) + f" | {selected.get(layer, '–')} |")
    out += ["", "## Agreement per category (held-out): plain head → selected head", "",
            "| layer | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for layer in sorted({r.layer for r in ev}):
        sel = selected.get(layer)
        cells = [f"{agree.get((layer, 'plain', c), float('nan')):.2f} → {agree.get((layer, sel, c), float('nan')):.2f}" for c in cats]
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    out += ["", "## Replayed static speedup over plain decoding, held-out prompts (selected head per layer)", "",
            "| layer | " + " | ".join(f"K={k}" for k in sorted({r.draft_len for r in ev})) + " |",
            "|---|" + "---|" * len({r.draft_len for r in ev})]
    for layer in sorted({r.layer for r in ev}):
        vals = {r.draft_len: r.replay_speedup for r in ev if r.layer == layer and r.head == selected.get(layer) and r.category == ALL}
        out.append(f"| {layer} | " + " | ".join(f"{vals[k]:.3f}" for k in sorted(vals)) + " |")
    return "\n".join(out) + "\n"


def rows_as_dicts(rows: list[ReportRow]) -> list[dict]:
    return [asdict(r) for r in rows]
