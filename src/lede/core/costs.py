"""The cost model: how long a draft step and a verification pass take *on this machine*.

    from lede.eval.cost_probe import measure_costs
    costs = measure_costs(decoder, exit_layers=[4, 8, 12], max_draft_len=8)
    costs.save("results/costs.json")
    costs.round_ms(layer=8, drafted=3)    # 3 draft steps at L = 8 + verifying 4 tokens
    costs = measure_costs(decoder, [4, 8, 12], 8, context_len=256, long_contexts=[1024, 2048])
    costs.at(position=1500).round_ms(8, 3)    # the same round with ~1.5k tokens in the cache

``draft_ms[L]``: one token through layers [0, L) and layer L's exit head (adapter and reduced
vocabulary included, as the decoder is configured; ``draft_ms[0]``, with ``LOOKUP`` among the layers:
one prompt-lookup match in the indexed context, microseconds, charged per drafted token; a context adapter's step attends over the context but
excludes feeding it the verified positions, about one layer on the round's A + 1 tokens). ``verify_ms[T]``:
T tokens through all layers and the full LM head (T = K + 1: the pending token and K drafts; T = 1 is a plain decoding step).
Each is the median of ``repeats`` runs after warm-up, measured round-robin over all items so that
drift of a shared machine spreads evenly, at a fixed context length (attention cost grows with it).

**Noise.** On a shared 2-core machine single timings scatter widely (IQR 35-45% of the median in a busy
hour), and a policy trained on the cost model exploits its errors: with 15 repeats the model priced
verifying 4 tokens at 1.11 plain steps where the engine paid ~1.25, and the learned policy's rounds then
cost ~9% more in the engine than the model said (the sweep's static cell ~3%). Two corrections, both cheap:
each repetition (one pass over all items, a few seconds) is divided by its own speed factor (the median over
items of time ÷ the item's median), which removes the machine's slow drift (halves the spread here), and the
medians are made monotone where the hardware is: a longer draft path (higher L) or more verified tokens never
cost less (isotonic regression, ``sklearn.isotonic``; verifying 1 and 2 tokens cost the same with this
project's two-row GEMM for one token, ``lede.core.kernels``, and pool to one value). ``spread`` keeps the
drift-corrected (q75 - q25) / median per item; ``measure_costs`` logs a warning above ``SPREAD_WARN``.

**Context.** Attention makes every pass slower as the cache grows, and not uniformly: verifying several
tokens at a 2,048-token context costs relatively more than at 256 (on the 2-core CPU, 2 tokens: 1.10 vs
1.01 plain steps; long-prompt categories such as summarization and RAG live there). ``long_contexts``
measures the same items at more context lengths; ``at(position)`` returns the model measured at the
context nearest to ``position`` (log scale), and every consumer that knows where a round happens (the
reward, the replayed speed, the oracle, dynamic exit) prices it there. Without ``long_contexts`` every
position gets the one measured context.

Derived quantities (units of one plain step, c = draft_ms[L] / verify_ms[1], v_T = verify_ms[T] / verify_ms[1]):
a round that drafts K tokens costs K·c + v_{K+1} plain steps and emits A + 1 tokens (A accepted), so
its speedup over plain decoding is (A + 1) / (K·c + v_{K+1}).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lede.core.io import atomic_write_text
from lede.core.policy import LOOKUP, RoundRecord


log = logging.getLogger(__name__)


@dataclass
class CostModel:
    model: str
    dtype: str
    device: str
    threads: int
    context_len: int
    draft_ms: dict[int, float]  # with the decoder's configured exit heads
    verify_ms: dict[int, float]
    draft_plain_ms: dict[int, float] = field(default_factory=dict)  # plain head: final norm + full LM head
    # more exit heads, by adapter design: {design: {layer: ms}} (``measure_costs(..., designs=)``)
    draft_design_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)  # (q75 - q25) / median per item
    # more context lengths: {context_len: CostModel of the same items there} (without nested by_context)
    by_context: dict[int, "CostModel"] = field(default_factory=dict)
    # the CPU linear kernels it was timed on (str of LoadedModel.kernels; "" = transformers' layers, or a GPU)
    kernels: str = ""

    def at(self, position: int) -> "CostModel":
        """The costs at the measured context length nearest to ``position`` (tokens in the cache), in log scale."""
        if not self.by_context:
            return self
        best, best_d = self, abs(math.log(max(position, 1) / self.context_len))
        for ctx, cm in self.by_context.items():
            if (d := abs(math.log(max(position, 1) / ctx))) < best_d:
                best, best_d = cm, d
        return best

    def each_context(self) -> list["CostModel"]:
        """This model (the base context) and the one of every measured long context, base first."""
        return [self, *self.by_context.values()]

    def head_draft_ms(self, head: str, layer: int) -> float:
        """The draft step at ``layer`` of the exit head named as the exit report names them (``plain``,
        ``plain_V<size>``, ``<design>[_V<size>]``): ``plain`` (full vocabulary) has its own measurement, a design
        timed separately (``draft_design_ms``) its own; anything else (``plain_V``, the configured design) the
        configured heads' ``draft_ms``."""
        if head == "plain":
            return self.draft_plain_ms[layer]
        return self.draft_design_ms.get(head.split("_V")[0], {}).get(layer, self.draft_ms[layer])

    def with_heads(self, heads: dict[int, str]) -> "CostModel":
        """The costs of a decoder with exit head ``heads[L]`` at layer L (the exit report's selection, by name):
        ``draft_ms[L] = head_draft_ms(heads[L], L)`` at every context; other layers keep ``draft_ms``."""
        import copy

        out = copy.deepcopy(self)
        for cm in out.each_context():
            cm.draft_ms.update({layer: cm.head_draft_ms(head, layer) for layer, head in heads.items()})
        return out

    @property
    def plain_ms(self) -> float:
        return self.verify_ms[1]

    def round_ms(self, layer: int | None, drafted: int, plain_head: bool = False) -> float:
        if layer is None or drafted == 0:
            return self.verify_ms[1]
        draft_ms = self.draft_plain_ms if plain_head else self.draft_ms
        if layer not in draft_ms:
            raise KeyError(f"exit layer {layer} was not measured by the cost model (measured: {sorted(self.draft_ms)})")
        if drafted + 1 not in self.verify_ms:
            raise KeyError(f"verification of {drafted + 1} tokens was not measured (max {max(self.verify_ms)})")
        return drafted * draft_ms[layer] + self.verify_ms[drafted + 1]

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def from_dict(cls, blob: dict) -> "CostModel":
        blob = dict(blob)
        blob["draft_ms"] = {int(k): v for k, v in blob["draft_ms"].items()}
        blob["verify_ms"] = {int(k): v for k, v in blob["verify_ms"].items()}
        blob["draft_plain_ms"] = {int(k): v for k, v in blob.get("draft_plain_ms", {}).items()}
        blob["draft_design_ms"] = {d: {int(k): v for k, v in ms.items()}
                                   for d, ms in blob.get("draft_design_ms", {}).items()}
        blob["by_context"] = {int(k): cls.from_dict(v) for k, v in blob.get("by_context", {}).items()}
        return cls(**blob)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls.from_dict(json.loads(Path(path).read_text()))


def kernels_of(lm) -> str:
    """The CPU linear kernels ``lm`` runs on, as the cost model records them ("" where lede's are not installed)."""
    return str(lm.kernels) if getattr(lm, "kernels", None) else ""


def kernels_mismatch(costs: CostModel, lm) -> str | None:
    """Why ``costs`` may misprice ``lm``'s rounds: it was timed on other CPU kernels (with ``kernels: auto`` a job that
    times its own at load can choose differently where two kernels are within ~10%), or None."""
    if costs.kernels and costs.kernels != kernels_of(lm):
        return (f"the cost model was timed on kernels ({costs.kernels}) but this job runs ({kernels_of(lm)}): its "
                "prices may not be this engine's (a one-token pass differed 30 vs 50 ms between kernels); load the "
                "model on the cost model's choice (lede.study.load_lm costs_path=) or fix config kernels")
    return None


def round_costs(costs: CostModel, prompt_len: int, rounds: list) -> list[CostModel]:
    """The cost model at each round's context: the prompt, the prefill's token and the tokens emitted before it."""
    out, pos = [], prompt_len + 1
    for r in rounds:
        out.append(costs.at(pos))
        pos += r.emitted
    return out


def modelled_ms(costs: CostModel, prompt_len: int, rounds: Sequence[tuple[int | None, int, int]]) -> float:
    """The cost model's time (ms) of a generation's rounds, each ``(exit layer or None, drafted, accepted)`` priced
    at its context (``round_costs``)."""
    recs = [RoundRecord(layer, drafted, accepted, 0.0, 0.0, 0.0) for layer, drafted, accepted in rounds]
    return sum(cm.round_ms(r.exit_layer, r.drafted) for r, cm in zip(recs, round_costs(costs, prompt_len, recs)))


def pricing_ratios(records: Sequence, costs: CostModel, plain: str = "plain") -> dict[str, float]:
    """How much more each method's decoding took in the engine than the cost model says, relative to plain decoding:
    per config, the median over (prompt, repeat) of (decode time ÷ modelled time) ÷ plain's on the same prompt and
    repeat. 1.0: the model prices the method's rounds as well as a plain step; above 1: its rounds (or its policy
    and features, which the model does not price) cost more than modelled, so replayed speedups overstate it.
    ``records``: ``lede.eval.bench.BenchRecord`` with ``rounds_detail`` (``run_bench(keep_rounds=True)``); configs
    without rounds (transformers' generate) are left out."""
    own = [(r, r.decode_s * 1000 / modelled_ms(costs, r.prompt_tokens, r.rounds_detail)) for r in records if r.rounds_detail]
    base = {(r.prompt, r.repeat): x for r, x in own if r.config == plain}
    if not base:
        raise ValueError(f"no {plain!r} records with rounds: run the benchmark with keep_rounds=True and plain decoding")
    out: dict[str, list[float]] = {}
    for r, x in own:
        if (r.prompt, r.repeat) in base:
            out.setdefault(r.config, []).append(x / base[r.prompt, r.repeat])
    return {name: statistics.median(xs) for name, xs in out.items()}
