"""Choosing the CPU linear kernels at load: time lede's and torch's for one-token and several-token passes
(interleaved) and keep the faster of each (``lede.core.kernels`` holds the kernels themselves; this module
drives a ``Decoder`` to time them, so it sits above the engine)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from lede.core.engine import Decoder
from lede.core.kernels import KERNELS, CpuLinear, KernelChoice, set_linear_kernels


def tune_cpu_kernels(lm, context: int = 128, tokens: int = 5, repeats: int = 5, seed: int = 0,
                     margin: float = 0.1) -> KernelChoice:
    """Time one forward of 1 and of ``tokens`` tokens over a cache of ``context`` tokens with each kernel set
    (interleaved, each timed pass after a warm-up pass; median of ``repeats``) and set the choice on ``lm`` (a LoadedModel
    whose linears are CpuLinear, ``use_cpu_kernels``): torch's for a width where it is faster by more than
    ``margin``, else ours."""
    if not any(isinstance(m, CpuLinear) for m in lm.model.modules()):
        raise ValueError("tune_cpu_kernels needs the model's linears wrapped by use_cpu_kernels first")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(lm.config.vocab_size), (context + tokens,), generator=gen).tolist()
    setups = {k: (lambda k=k: _routed(lm.model, k)) for k in KERNELS}
    ms = _time_passes(Decoder(lm), ids, context, (1, tokens), setups, repeats=repeats, timed_per_block=1)
    # torch's only where clearly faster: a close call would otherwise flip between jobs on a noisy host
    pick = [("torch" if ms[f"torch/{t}"] < (1 - margin) * ms[f"lede/{t}"] else "lede") for t in (1, tokens)]
    choice = KernelChoice(*pick, ms=ms)
    set_linear_kernels(lm.model, choice.one_token, choice.many_tokens)
    return choice


@contextmanager
def _routed(model: nn.Module, kernels: str):
    """Every CpuLinear on ``kernels`` for both widths (set, not restored: tune_cpu_kernels sets its choice after)."""
    set_linear_kernels(model, kernels, kernels)
    yield


def _time_passes(dec, ids: list[int], context: int, widths, setups: dict, repeats: int,
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
