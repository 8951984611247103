"""Measuring costs on the machine at hand.

* ``measure_costs`` times every draft step and verification pass of a ``Decoder`` and returns a
  ``lede.core.costs.CostModel`` (the data and its pricing live there): the workflow's ``cost_model`` rule.
* ``probe_floor`` (``lede costs``) sets those passes against the memory floor: the read bandwidth, the bytes of
  weights a pass reads, hence the least a pass can cost, and passes of T = 1, 2, 3, 5, 9 tokens at several contexts
  with each linear kernel (``lede.core.kernels``), interleaved; optionally plain decoding's tokens/s per kernel
  beside transformers' ``generate``.

Both time through ``round_robin`` (every item once per repetition, in turn, so that a drifting host affects all
alike) and ``drift_corrected``.

    from lede.eval.cost_probe import measure_costs
    costs = measure_costs(decoder, exit_layers=[4, 8, 12], max_draft_len=8, long_contexts=[1024, 2048])
    costs.save("results/costs.json")
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from sklearn.isotonic import isotonic_regression

from lede.core.costs import CostModel, kernels_of
from lede.core.engine import Decoder, KVCache
from lede.core.lookup import NgramIndex
from lede.core.policy import LOOKUP
from lede.core.tuning import round_robin

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
    times = drift_corrected(round_robin(items, repeats, warmup, decoder.lm.device))
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
    wide = {f"{name}@{cm.context_len}": round(x, 2) for cm in base.each_context()
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


# ---- the floor probe (lede costs) ---------------------------------------------------------------------------------
FLOOR_TOKENS = (1, 2, 3, 5, 9)
FLOOR_CONTEXTS = (256, 2048)
#: the issue's targets: a one-token pass <= 1.25x the floor; T <= 5 tokens <= 1.15x a one-token pass, T = 9 <= 1.3x
TARGET_ONE_TOKEN_OVER_FLOOR, TARGET_T5_OVER_ONE, TARGET_T9_OVER_ONE = 1.25, 1.15, 1.3


def read_bandwidth(mb: int = 2048, repeats: int = 9, device: torch.device | str = "cpu") -> list[float]:
    """STREAM-style read bandwidth, GB/s, of each of ``repeats`` sums over a float32 buffer of ``mb`` MiB on ``device``
    (larger than the caches: a pass reads its weights from memory) with torch's current threads."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    x.sum()  # first touch
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        out.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x
    return out


def weight_bytes(lm) -> int:
    """Bytes of weights one full decoding pass reads: every decoder layer, the final norm and the LM head (the
    embedding contributes one row; a head tied to it is read whole)."""
    inner = lm.model.model
    seen, total = set(), 0
    for t in [*inner.layers.parameters(), *inner.norm.parameters(), lm.model.lm_head.weight]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass
class FloorProbe:
    """``probe_floor``'s result. ``ms[variant][ctx][T]``: median ms of a pass of T tokens over ``ctx`` cached tokens
    (drift-corrected); ``"chosen"`` is the model as it runs (``lm.kernels``, ``lm.fast_layers``), ``"onednn"``,
    ``"lede"``, ``"torch"`` every CpuLinear on that kernel, ``"torch_own_layers"`` F.linear in transformers' own layer
    modules (the engine before ``lede.core.fastpath``)."""

    model: str
    threads: int
    chosen: str  # str(lm.kernels)
    bandwidth_gb_s: float  # median of every bandwidth reading (before and after the passes)
    bandwidth_runs_gb_s: list[float]
    weight_bytes: int
    ms: dict[str, dict[int, dict[int, float]]]
    spread: dict[str, dict[int, dict[int, float]]]  # IQR / median of the same
    decode: dict = field(default_factory=dict)  # {"tokens_per_s": {config: median}, "ratio": {config: ...}, ...}
    widths: dict = field(default_factory=dict)  # width_agreement: "<kernel>/<T>" -> flips of T-token vs 1-token passes

    @property
    def floor_ms(self) -> float:
        """The least a full pass can cost: its weight bytes at the measured read bandwidth."""
        return self.weight_bytes / (self.bandwidth_gb_s * 1e9) * 1e3

    def contexts(self, kernel: str = "chosen") -> dict:
        """{"<ctx>": {"ms", "ratio_to_one_token", "ratio_to_floor", "spread"}} of one kernel (the JSON's shape)."""
        out = {}
        for ctx, by_t in self.ms[kernel].items():
            one = by_t[1]
            out[str(ctx)] = {
                "ms": {str(t): _sig(v) for t, v in by_t.items()},
                "ratio_to_one_token": {str(t): round(v / one, 3) for t, v in by_t.items() if t != 1},
                "ratio_to_floor": {str(t): round(v / self.floor_ms, 3) for t, v in by_t.items()},
                "spread": {str(t): round(v, 3) for t, v in self.spread[kernel][ctx].items()},
            }
        return out

    def targets(self, kernel: str = "chosen") -> dict[str, bool]:
        """Whether ``kernel`` meets the issue's targets at every context."""
        by_ctx = self.ms[kernel]
        return {
            f"one_token_over_floor<={TARGET_ONE_TOKEN_OVER_FLOOR}": all(
                v[1] <= TARGET_ONE_TOKEN_OVER_FLOOR * self.floor_ms for v in by_ctx.values()),
            f"T<=5_over_one_token<={TARGET_T5_OVER_ONE}": all(
                v[t] <= TARGET_T5_OVER_ONE * v[1] for v in by_ctx.values() for t in v if 1 < t <= 5),
            f"T=9_over_one_token<={TARGET_T9_OVER_ONE}": all(
                v[9] <= TARGET_T9_OVER_ONE * v[1] for v in by_ctx.values() if 9 in v),
        }

    def to_json(self) -> dict:
        first = min(self.ms["chosen"])
        return {
            "bandwidth_gb_s": round(self.bandwidth_gb_s, 2), "weight_bytes": self.weight_bytes,
            "floor_ms": _sig(self.floor_ms),
            "one_token_over_floor": round(self.ms["chosen"][first][1] / self.floor_ms, 3),
            "contexts": self.contexts("chosen"),
            "model": self.model, "threads": self.threads, "kernels": self.chosen,
            "bandwidth_runs_gb_s": [round(x, 2) for x in self.bandwidth_runs_gb_s],
            "targets": self.targets("chosen"),
            "by_kernel": {k: {"contexts": self.contexts(k), "targets": self.targets(k)} for k in self.ms if k != "chosen"},
            "decode": self.decode,
            "width_agreement": self.widths,
        }

    def format(self) -> str:
        lines = [f"model={self.model} threads={self.threads} chosen kernels: {self.chosen}",
                 f"read bandwidth {self.bandwidth_gb_s:.1f} GB/s (runs {min(self.bandwidth_runs_gb_s):.1f}-"
                 f"{max(self.bandwidth_runs_gb_s):.1f}), weights {self.weight_bytes / 1e6:.0f} MB per pass, "
                 f"floor {self.floor_ms:.1f} ms",
                 f"{'kernel':<8} {'ctx':>5} " + " ".join(f"{'T=' + str(t):>15}" for t in next(iter(
                     self.ms["chosen"].values()))) + "   (ms  x one-token  x floor)"]
        for kernel, by_ctx in self.ms.items():
            for ctx, by_t in by_ctx.items():
                cells = [f"{v:6.1f} {v / by_t[1]:4.2f} {v / self.floor_ms:4.2f}" for v in by_t.values()]
                lines.append(f"{kernel:<8} {ctx:>5} " + " ".join(f"{c:>15}" for c in cells))
        for kernel in self.ms:
            met = self.targets(kernel)
            lines.append(f"targets {kernel}: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
        for name, v in (self.decode.get("tokens_per_s") or {}).items():
            lines.append(f"plain decoding {name:<16} {v:7.2f} tok/s  x{self.decode['ratio'][name]:.3f} of "
                         f"{self.decode['reference']}")
        for key, w in self.widths.items():
            lines.append(f"{key:<12} T-token vs 1-token passes: greedy token differs at {w['argmax_differs']}/"
                         f"{w['positions']} positions (top-2 margins there {w['top2_margin_at_differences']}), "
                         f"max |dlogit| {w['max_abs_logit_diff']:.1e}, bit-identical {w['bit_identical']}")
        return "\n".join(lines)


PRICE_CHECK_TOLERANCE = 0.15  # cost model vs floor probe: how far their relative price of a T-token pass may differ


def price_check(costs: CostModel, floor: FloorProbe, tolerance: float = PRICE_CHECK_TOLERANCE) -> dict[str, dict]:
    """The cost model's price of verifying T tokens (``verify_ms[T] / verify_ms[1]``) against the floor probe's ratio of
    a T-token pass to a one-token pass on the model as it runs (``"chosen"``), at every context both measured and every
    T both timed: ``{"<ctx>/<T>": {"cost_model", "floor_probe", "ratio"}}`` for those that differ by more than
    ``tolerance`` (relative). Two timings of the same passes, minutes apart in one job: where they disagree the host was
    busy during one of them, and every reward, replay and policy is priced by the cost model (on 2026-12-07 a
    run's cost model priced 5 and 9 tokens at 1.48 / 2.15 plain steps, its floor probe at 1.23 / 1.72, its spreads 2-4x
    the quiet run's, which had agreed within 7%: 1.15 / 1.64 vs 1.19 / 1.64; the same job rerun agreed within 12%)."""
    out = {}
    for cm in costs.each_context():
        probed = floor.ms.get("chosen", {}).get(cm.context_len)
        if not probed or 1 not in probed:
            continue
        for t, ms in probed.items():
            if t == 1 or t not in cm.verify_ms:
                continue
            model, probe = cm.verify_ms[t] / cm.verify_ms[1], ms / probed[1]
            if abs(model / probe - 1) > tolerance:
                out[f"{cm.context_len}/{t}"] = {"cost_model": round(model, 3), "floor_probe": round(probe, 3),
                                                "ratio": round(model / probe, 3)}
    return out


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def eager_layers(fast):
    """The eager lean forward of a model's ``fast_layers`` (``LayerStack.eager``), or None where it has none."""
    return None if fast is None else fast.eager


@contextmanager
def routing_restored(lm):
    """Run a probe that re-routes ``lm``'s CPU linears and lean layer forward; put the kernels the model chose at load
    (``lm.kernels``) and its ``fast_layers`` back afterwards, whatever the probe raised."""
    from lede.core.kernels import set_linear_kernels

    choice, fast = getattr(lm, "kernels", None), getattr(lm, "fast_layers", None)
    try:
        yield
    finally:
        lm.fast_layers = fast
        if choice is not None:
            set_linear_kernels(lm.model, choice.one_token, choice.many_tokens)


@torch.inference_mode()
def probe_floor(lm, contexts: Sequence[int] = FLOOR_CONTEXTS, tokens: Sequence[int] = FLOOR_TOKENS,
                kernels: Sequence[str] | None = None, repeats: int = 7, warmup: int = 1, bandwidth_mb: int = 2048,
                bandwidth_repeats: int = 9) -> FloorProbe:
    """Read bandwidth (before and after), weight bytes, and passes of ``tokens`` tokens over each of ``contexts``
    cached tokens: as the model runs (``"chosen"``), with every CpuLinear on each of ``kernels`` (default: every
    available kernel), and with F.linear in transformers' own layers (``"torch_own_layers"``), all interleaved
    (``round_robin``: per repetition and item, one untimed pass and the median of three timed ones, as in decoding,
    where a pass follows a pass on the same kernels)."""
    from lede.core.kernels import CpuLinear, available_kernels, set_linear_kernels

    tokens = sorted(set(int(t) for t in tokens) | {1})
    limit = lm.model.config.max_position_embeddings
    if any(c < 1 for c in contexts) or max(contexts) + max(tokens) > limit:
        raise ValueError(f"contexts {list(contexts)} (+ {max(tokens)} tokens) must lie in 1..{limit} (the model's "
                         "positions): lower them")
    ours = any(isinstance(m, CpuLinear) for m in lm.model.modules())
    choice, fast = getattr(lm, "kernels", None), getattr(lm, "fast_layers", None)
    eager = eager_layers(fast)
    # variant -> (one-token kernel, several-token kernel, lean layer forward): what lede runs ("chosen"; compiled
    # layers where the model has them), every kernel alone in the eager lean forward, and F.linear in transformers'
    # own layer modules (the engine's path before lede.core.fastpath)
    variants: dict = {"chosen": (choice.one_token, choice.many_tokens, fast) if ours and choice else None}
    if ours:
        variants |= {k: (k, k, eager) for k in (kernels or available_kernels())}
        if fast is not None:
            variants["torch_own_layers"] = ("torch", "torch", None)
    dec = Decoder(lm)
    vocab = lm.model.config.vocab_size
    ids = torch.randint(0, vocab, (max(contexts) + max(tokens),), generator=torch.Generator().manual_seed(0)).tolist()

    def route(variant: str) -> None:
        if variants[variant] is not None:
            one, many, lm.fast_layers = variants[variant]
            set_linear_kernels(lm.model, one, many)

    items = []
    for ctx in contexts:
        cache = dec.new_cache(ctx + max(tokens) + 1)
        dec.prefill(ids[:ctx], cache)
        for kernel in variants:
            for t in tokens:
                def one_pass(cache=cache, ctx=ctx, t=t):
                    dec.verify(ids[ctx : ctx + t], None, cache)
                    cache.crop(ctx)
                items.append(((kernel, ctx, t), one_pass, partial(route, kernel)))
    bandwidth = read_bandwidth(bandwidth_mb, bandwidth_repeats, lm.device)
    with routing_restored(lm):
        times = drift_corrected(round_robin(items, repeats, warmup, lm.device, warm_each=1, timed_each=3))
    bandwidth += read_bandwidth(bandwidth_mb, bandwidth_repeats, lm.device)

    def spread(xs) -> float:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return float((q[2] - q[0]) / statistics.median(xs))

    ms: dict = {}
    sp: dict = {}
    for (kernel, ctx, t), xs in times.items():
        ms.setdefault(kernel, {}).setdefault(ctx, {})[t] = statistics.median(xs)
        sp.setdefault(kernel, {}).setdefault(ctx, {})[t] = spread(xs)
    chosen = (str(choice) + (", compiled layers" if fast is not eager else "")) if ours else "transformers"
    return FloorProbe(model=lm.name, threads=torch.get_num_threads(), chosen=chosen,
                      bandwidth_gb_s=statistics.median(bandwidth), bandwidth_runs_gb_s=bandwidth,
                      weight_bytes=weight_bytes(lm), ms=ms, spread=sp)


def plain_decoding_by_kernel(lm, prompts: Sequence, kernels: Sequence[str] | None = None, max_new_tokens: int = 64,
                             repeats: int = 1) -> dict:
    """Plain decoding's tokens/s with every CpuLinear on each kernel (through the model's lean layer forward, as
    loaded), with lede's and torch's kernels in transformers' own layer modules (``<kernel>_own_layers``: the engine
    before ``lede.core.fastpath``), and transformers' ``generate`` on its own layers, interleaved over ``prompts``
    (``BenchPrompt``s) in one run; ratios over the first kernel's plain decoding (medians of per-prompt ratios).
    Leaves the model as it was. A model on transformers' own layers (``kernels="torch"``, GPU, other dtypes) has one
    variant, ``"transformers"``."""
    from lede.core.kernels import CpuLinear, available_kernels, set_linear_kernels
    from lede.core.policy import Autoregressive
    from lede.eval.bench import HF_GENERATE, PLAIN, run_bench, summarize

    choice, fast = getattr(lm, "kernels", None), getattr(lm, "fast_layers", None)
    eager = eager_layers(fast)
    if choice is None or not any(isinstance(m, CpuLinear) for m in lm.model.modules()):
        variants: dict = {"transformers": None}
    else:  # variant -> (one-token kernel, several-token kernel, layer forward)
        variants = {"compiled": (choice.one_token, choice.many_tokens, fast)} if fast is not eager else {}
        variants |= {k: (k, k, eager) for k in (kernels or available_kernels())}
        if fast is not None:
            variants |= {f"{k}_own_layers": (k, k, None) for k in ("lede", "torch")}

    def under(variant: str) -> Callable:
        def make(_prompt):
            if variants[variant] is not None:  # before this config's run: each config sets its own
                one, many, lm.fast_layers = variants[variant]
                set_linear_kernels(lm.model, one, many)
            return Autoregressive()
        return make

    names = list(variants)
    configs: dict = {PLAIN: under(names[0])}  # the reference the ratios divide by
    configs |= {f"plain_{v}": under(v) for v in names[1:]}
    configs[HF_GENERATE] = HF_GENERATE
    with routing_restored(lm):
        records = run_bench(Decoder(lm), list(prompts), configs, max_new_tokens=max_new_tokens, repeats=repeats)
    rows = summarize(records)["all"]
    name = lambda c: names[0] if c == PLAIN else c.removeprefix("plain_")
    return {"reference": f"plain decoding on {names[0]}", "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "tokens_per_s": {name(r.config): round(r.median_tokens_per_s, 3) for r in rows},
            "ratio": {name(r.config): round(r.median_ratio, 4) for r in rows},
            "identity_rate": {name(r.config): r.identity_rate for r in rows}}


@torch.inference_mode()
def width_agreement(lm, ids: Sequence[int], prefix: int, widths: Sequence[int] = (5, 9),
                    kernels: Sequence[str] | None = None) -> dict:
    """How a T-token pass's logits differ from one-token passes', teacher-forced over ``ids`` after a prefill of
    ``prefix`` tokens: per kernel and width, the positions whose greedy token differs (a speculative round could then
    differ from plain decoding), the largest |logit difference|, whether the two are bit-identical (batch invariance),
    and the one-token pass's top-2 margin at each difference (a near-tie or not). Kernel ``"chosen"``: the model's
    routing. Leaves the model on its chosen kernels."""
    from lede.core.kernels import CpuLinear, available_kernels, set_linear_kernels

    choice, fast = getattr(lm, "kernels", None), getattr(lm, "fast_layers", None)
    ours = choice is not None and any(isinstance(m, CpuLinear) for m in lm.model.modules())
    kernels = list(kernels or available_kernels()) if ours else []
    dec = Decoder(lm)
    ids = list(ids)

    def logits(width: int) -> torch.Tensor:  # [len(ids) - prefix, V]
        cache = dec.new_cache(len(ids) + width)
        dec.prefill(ids[:prefix], cache)
        return torch.cat([dec.verify(ids[p : p + width], None, cache) for p in range(prefix, len(ids), width)])

    out = {}
    with routing_restored(lm):
        for kernel in ["chosen", *kernels]:
            if ours:
                set_linear_kernels(lm.model, *((choice.one_token, choice.many_tokens) if kernel == "chosen"
                                               else (kernel, kernel)))
                lm.fast_layers = fast if kernel == "chosen" else eager_layers(fast)
            one = logits(1)
            top2 = one.topk(2, dim=-1).values
            for w in widths:
                many = logits(w)
                differ = (one.argmax(-1) != many.argmax(-1)).nonzero().flatten().tolist()
                out[f"{kernel}/{w}"] = {
                    "positions": len(one), "argmax_differs": len(differ), "bit_identical": bool(torch.equal(one, many)),
                    "max_abs_logit_diff": float((one - many).abs().max()),
                    "top2_margin_at_differences": [round(float(top2[i, 0] - top2[i, 1]), 6) for i in differ],
                    "median_top2_margin": round(float((top2[:, 0] - top2[:, 1]).median()), 4)}
    return out
