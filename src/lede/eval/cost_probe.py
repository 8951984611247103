"""Measuring the cost model on the machine at hand: ``measure_costs`` times every draft step and verification
pass of a ``Decoder`` and returns a ``lede.core.costs.CostModel`` (the data and its pricing live there).

    from lede.eval.cost_probe import measure_costs
    costs = measure_costs(decoder, exit_layers=[4, 8, 12], max_draft_len=8, long_contexts=[1024, 2048])
    costs.save("results/costs.json")

See ``lede.core.costs`` for what is measured, the drift correction and the monotone fit.
"""

from __future__ import annotations

import logging
import statistics
import time
from functools import partial

import numpy as np
import torch
from sklearn.isotonic import isotonic_regression

from lede.core.costs import CostModel, kernels_of
from lede.core.engine import Decoder, KVCache
from lede.core.lookup import NgramIndex
from lede.core.policy import LOOKUP

SPREAD_WARN = 0.25  # drift-corrected IQR / median of an item above which the measurement is distrusted
log = logging.getLogger(__name__)


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
            decoder.check_exit(layer)
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
        dec.prefill(prefix[:ctx], cache)
        return cache

    def draft(dec, cache, ctx, layer, head=None):
        dec.draft_step(7, layer, cache, head)
        cache.crop(ctx)

    def verify(cache, ctx, t):
        decoder.verify([7] * t, None, cache)
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
