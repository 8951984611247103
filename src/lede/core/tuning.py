"""Choosing the CPU linear kernels at load: time every available kernel (``lede.core.kernels.KERNELS``) for one-token
and several-token passes (interleaved) and keep the fastest of each (``lede.core.kernels`` holds the kernels themselves; this module
drives a ``Decoder`` to time them, so it sits above the engine)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from lede.core.engine import Decoder
from lede.core.kernels import CpuLinear, KernelChoice, available_kernels, set_linear_kernels


def tune_cpu_kernels(lm, context: int = 128, tokens: int = 5, repeats: int = 5, seed: int = 0,
                     margin: float = 0.1) -> KernelChoice:
    """Time one forward of 1 and of ``tokens`` tokens over a cache of ``context`` tokens with each available kernel
    (interleaved, each timed pass after a warm-up pass; median of ``repeats``) and set the choice on ``lm`` (a
    LoadedModel whose linears are CpuLinear, ``use_cpu_kernels``). Per width the first of ``available_kernels()``
    (oneDNN, batch-invariant, where there is one) is kept unless another is faster by more than ``margin``: a close
    call would otherwise flip between jobs on a noisy host."""
    if not any(isinstance(m, CpuLinear) for m in lm.model.modules()):
        raise ValueError("tune_cpu_kernels needs the model's linears wrapped by use_cpu_kernels first")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(lm.config.vocab_size), (context + tokens,), generator=gen).tolist()
    kernels = available_kernels()
    setups = {k: partial(set_linear_kernels, lm.model, k, k) for k in kernels}  # set, not restored: the choice follows
    ms = time_passes(Decoder(lm), ids, context, (1, tokens), setups, repeats=repeats, timed_per_block=1)
    pick = [pick_kernel(ms, kernels, t, margin) for t in (1, tokens)]
    choice = KernelChoice(*pick, ms=ms)
    set_linear_kernels(lm.model, choice.one_token, choice.many_tokens)
    return choice


def pick_kernel(ms: dict[str, float], kernels: tuple[str, ...], tokens: int, margin: float) -> str:
    """``kernels[0]`` unless the fastest of the others beats it by more than ``margin`` (``ms``: {"<kernel>/<t>": ms})."""
    best = min(kernels, key=lambda k: ms[f"{k}/{tokens}"])
    return best if ms[f"{best}/{tokens}"] < (1 - margin) * ms[f"{kernels[0]}/{tokens}"] else kernels[0]


def time_passes(dec, ids: list[int], context: int, widths, setups: dict[str, Callable[[], None]], repeats: int,
                timed_per_block: int) -> dict[str, float]:
    """Median ms of one forward of t tokens (t in ``widths``) over a cache of ``context`` tokens of ``ids``, under
    each of ``setups`` (name -> a callable that routes the model, run before each block), as ``{"<name>/<t>": ms}``.
    Interleaved (``round_robin``) so that a drifting host affects every setup alike: each of ``repeats`` rounds runs,
    per width and setup, a block of one warm-up pass and ``timed_per_block`` timed ones (their median); the cache
    is cropped back to ``context`` after every pass."""
    with torch.inference_mode():
        cache = dec.new_cache(context + max(widths))
        dec._layers(dec.embed(torch.tensor([ids[:context]])), 0, dec.n_layers, cache)

        def one_pass(t: int) -> None:
            dec.verify(ids[context : context + t], None, cache)
            cache.crop(context)

        items = [(f"{name}/{t}", partial(one_pass, t), setup) for t in widths for name, setup in setups.items()]
        times = round_robin(items, repeats, 0, dec.lm.device, warm_each=1, timed_each=timed_per_block)
    return {key: statistics.median(v) for key, v in times.items()}


def round_robin(items: Sequence[tuple], repeats: int, warmup: int, device: torch.device | str = "cpu",
                warm_each: int = 0, timed_each: int = 1) -> dict:
    """{key: [ms per repetition]} of ``items`` ([(key, fn)] or [(key, fn, prepare)]): ``warmup`` untimed passes over
    all items, then ``repeats`` passes in which each item runs ``prepare()`` (untimed), ``warm_each`` untimed calls
    of ``fn`` and ``timed_each`` timed ones (their median is the repetition's time), in turn."""
    times: dict = {item[0]: [] for item in items}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for rep in range(warmup + repeats):
        for key, fn, *prepare in items:
            for p in prepare:
                p()
            for _ in range(warm_each):
                fn()
            block = []
            for _ in range(timed_each):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                block.append((time.perf_counter() - t) * 1000)
            if rep >= warmup:
                times[key].append(statistics.median(block))
    return times
