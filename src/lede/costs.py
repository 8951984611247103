"""The cost model: how long a draft step and a verification pass take *on this machine*.

    from lede.costs import measure_costs
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
project's two-row GEMM for one token, ``lede.kernels``, and pool to one value). ``spread`` keeps the
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
from sklearn.isotonic import isotonic_regression

from lede.engine import Decoder, KVCache
from lede.io import atomic_write_text
from lede.lookup import NgramIndex
from lede.policy import LOOKUP, RoundRecord


SPREAD_WARN = 0.25  # drift-corrected IQR / median of an item above which the measurement is distrusted
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
        for cm in [out, *out.by_context.values()]:
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
    """Why ``costs`` may misprice ``lm``'s rounds: it was timed on other CPU kernels (with ``kernels: auto`` each job
    chooses at load, so two jobs differ where the two kernels are within ~10%), or None."""
    if costs.kernels and costs.kernels != kernels_of(lm):
        return (f"the cost model was timed on kernels ({costs.kernels}) but this job runs ({kernels_of(lm)}): its "
                "prices may be off by up to ~10%; fix the choice with config kernels: lede or torch to remove the doubt")
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
    ``records``: ``lede.bench.BenchRecord`` with ``rounds_detail`` (``run_bench(keep_rounds=True)``); configs
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


@torch.inference_mode()
def measure_costs(
    decoder: Decoder,
    exit_layers: list[int],
    max_draft_len: int,
    context_len: int = 256,
    repeats: int = 40,
    warmup: int = 3,
    long_contexts: list[int] = (),
    designs: dict | None = None,
) -> CostModel:
    """Median times of every draft step and verification pass at ``context_len`` tokens in the cache (and
    at each of ``long_contexts``, in ``by_context``), measured round-robin over all items and contexts.
    ``designs``: {design: {layer: ExitHead}}, more exit heads to time (``draft_design_ms``); a context
    adapter's head needs its own cache, so it is timed through a decoder that drafts with it."""
    for layer in exit_layers:
        if layer != LOOKUP:
            decoder._check_exit(layer)
    if max_draft_len < 1:
        raise ValueError(f"max_draft_len={max_draft_len} must be >= 1")
    contexts = [context_len] + [int(c) for c in long_contexts if int(c) != context_len]
    if any(c < 1 for c in contexts) or len(set(contexts)) != len(contexts):
        raise ValueError(f"context lengths {contexts} must be distinct and >= 1")
    if (limit := decoder.lm.model.config.max_position_embeddings) < max(contexts) + max_draft_len + 2:
        raise ValueError(f"context length {max(contexts)} (+ a round of {max_draft_len + 1} tokens) exceeds the "
                         f"model's {limit} positions: lower costs.long_contexts")
    vocab = decoder.lm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (max(contexts),), generator=gen).tolist()
    alts = {d: Decoder(decoder.lm, exit_heads=heads, max_draft_len=decoder.max_draft_len)
            for d, heads in (designs or {}).items()}  # a context adapter drafts through its decoder's cache

    def filled(dec: Decoder, ctx: int) -> KVCache:
        """A cache holding ctx tokens (a context adapter's backlog is consumed at its first, warm-up, draft)."""
        cache = dec.new_cache(ctx + max_draft_len + 2)
        dec._prefill(prefix[:ctx], cache)
        return cache

    def draft(dec, cache, ctx, layer, head=None):
        dec._draft_step(7, layer, cache, head)
        cache.crop(ctx)

    def verify(cache, ctx, t):
        decoder._verify([7] * t, None, cache)
        cache.crop(ctx)

    items = []
    for ctx in contexts:
        cache = filled(decoder, ctx)
        index = NgramIndex(*decoder.lookup_ngram).sync(prefix[:ctx], [])  # a lookup draft: one match (per token)
        items += [((ctx, f"draft_{l}"), index.match if l == LOOKUP else partial(draft, decoder, cache, ctx, l))
                  for l in exit_layers]
        for design, alt in alts.items():
            alt_cache = filled(alt, ctx)
            items += [((ctx, f"design_{design}_{l}"), partial(draft, alt, alt_cache, ctx, l))
                      for l in alt.exit_heads if l in exit_layers]
        items += [((ctx, f"draftplain_{l}"), partial(draft, decoder, cache, ctx, l, decoder.plain_head))
                  for l in exit_layers if l != LOOKUP]
        items += [((ctx, f"verify_{t}"), partial(verify, cache, ctx, t)) for t in range(1, max_draft_len + 2)]
    times: dict[tuple[int, str], list[float]] = {key: [] for key, _ in items}
    sync = torch.cuda.synchronize if decoder.lm.device.type == "cuda" else (lambda: None)
    for rep in range(warmup + repeats):
        for key, fn in items:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if rep >= warmup:
                times[key].append((time.perf_counter() - t) * 1000)

    times = drift_corrected(times)
    med = {key: statistics.median(xs) for key, xs in times.items()}

    def spread(xs) -> float:
        q = statistics.quantiles(xs, n=4)
        return float((q[2] - q[0]) / statistics.median(xs))

    def model_at(ctx: int) -> CostModel:
        def monotone(names: dict) -> dict:
            """{k: item} -> {k: median}, non-decreasing in k (a deeper exit, more verified tokens never cost less)."""
            ks = sorted(names)
            return {k: float(v) for k, v in zip(ks, isotonic_regression([med[ctx, names[k]] for k in ks]))} if ks else {}

        layers = [l for l in exit_layers if l != LOOKUP]
        lookup = {LOOKUP: float(med[ctx, f"draft_{LOOKUP}"])} if LOOKUP in exit_layers else {}  # not a layer: no order
        return CostModel(
            model=decoder.lm.name, dtype=str(decoder.lm.dtype).removeprefix("torch."), device=str(decoder.lm.device),
            threads=torch.get_num_threads(), context_len=ctx,
            draft_ms=lookup | monotone({l: f"draft_{l}" for l in layers}),
            verify_ms=monotone({t: f"verify_{t}" for t in range(1, max_draft_len + 2)}),
            draft_plain_ms=lookup | monotone({l: f"draftplain_{l}" for l in layers}),
            draft_design_ms={d: monotone({l: f"design_{d}_{l}" for l in heads if l in layers})
                             for d, heads in (designs or {}).items()},
            spread={name: spread(xs) for (c, name), xs in times.items() if c == ctx},
            kernels=kernels_of(decoder.lm),
        )

    base = model_at(context_len)
    base.by_context = {c: model_at(c) for c in contexts[1:]}
    wide = {f"{name}@{cm.context_len}": round(x, 2) for cm in [base, *base.by_context.values()]
            for name, x in cm.spread.items() if x > SPREAD_WARN}
    if wide:
        log.warning("cost model: %d of %d items scatter more than %.0f%% (IQR / median after drift correction: %s); "
                    "the machine is busy: measure again when it is quieter, or raise costs.repeats",
                    len(wide), len(times), 100 * SPREAD_WARN, wide)
    return base


def drift_corrected(times: dict) -> dict:
    """Each repetition's times divided by that repetition's speed factor, the median over items of time ÷ the
    item's median (``times``: {item: [ms per repetition]}, all lists of one length, repetition i of every item
    measured in one round-robin pass). Removes the machine's drift between passes, not the scatter within one."""
    keys = list(times)
    t = np.array([times[k] for k in keys], dtype=float)  # [items, repeats]
    if t.size == 0:
        return dict(times)
    factor = np.median(t / np.median(t, axis=1, keepdims=True), axis=0)  # [repeats]
    return {k: row.tolist() for k, row in zip(keys, t / factor)}
