"""Choosing the CPU linear kernels at load: time every available kernel (``lede.core.kernels.KERNELS``) for one-token
and several-token passes (interleaved) and keep the fastest of each (``lede.core.kernels`` holds the kernels themselves; this module
drives a ``Decoder`` to time them, so it sits above the engine)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

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
    setups = {k: (lambda k=k: _routed(lm.model, k)) for k in kernels}
    ms = time_passes(Decoder(lm), ids, context, (1, tokens), setups, repeats=repeats, timed_per_block=1)
    pick = [pick_kernel(ms, kernels, t, margin) for t in (1, tokens)]
    choice = KernelChoice(*pick, ms=ms)
    set_linear_kernels(lm.model, choice.one_token, choice.many_tokens)
    return choice


def pick_kernel(ms: dict[str, float], kernels: tuple[str, ...], tokens: int, margin: float) -> str:
    """``kernels[0]`` unless the fastest of the others beats it by more than ``margin`` (``ms``: {"<kernel>/<t>": ms})."""
    best = min(kernels, key=lambda k: ms[f"{k}/{tokens}"])
    return best if ms[f"{best}/{tokens}"] < (1 - margin) * ms[f"{kernels[0]}/{tokens}"] else kernels[0]


@contextmanager
def _routed(model: nn.Module, kernels: str):
    """Every CpuLinear on ``kernels`` for both widths (set, not restored: the caller sets its choice after)."""
    set_linear_kernels(model, kernels, kernels)
    yield


def time_passes(dec, ids: list[int], context: int, widths, setups: dict, repeats: int,
                 timed_per_block: int) -> dict[str, float]:
    """Median ms of one forward of t tokens (t in ``widths``) over a cache of ``context`` tokens of ``ids``, under
    each of ``setups`` (name -> context-manager factory), as ``{"<name>/<t>": ms}``. Interleaved so that a drifting
    host affects every setup alike: each of ``repeats`` rounds runs, per width and setup, a block of one warm-up
    pass and ``timed_per_block`` timed ones; the cache is cropped back to ``context`` after every pass."""
    times: dict[str, list[float]] = {f"{name}/{t}": [] for name in setups for t in widths}
    with torch.inference_mode():
        cache = dec.new_cache(context + max(widths))
        dec._layers(dec.embed(torch.tensor([ids[:context]])), 0, dec.n_layers, cache)
        for _ in range(repeats):
            for t in widths:
                for name, setup in setups.items():
                    with setup():
                        for i in range(timed_per_block + 1):
                            start = time.perf_counter()
                            dec.verify(ids[context : context + t], None, cache)
                            if i:
                                times[f"{name}/{t}"].append(time.perf_counter() - start)
                            cache.crop(context)
    return {key: statistics.median(v) * 1e3 for key, v in times.items()}
